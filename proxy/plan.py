"""Who serves, who is shadowed and who is written, for a stage and a kind of request. Pure."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from cutover.stages import Stage


class Side(enum.StrEnum):
    SOURCE = "source"
    TARGET = "target"

    @property
    def other(self) -> Side:
        return Side.TARGET if self is Side.SOURCE else Side.SOURCE


Kind = Literal["read", "write"]


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with one request. ``serve`` answers the researcher; for a write it is the
    authoritative side, and ``replicate`` (if any) receives the write afterwards."""

    stage: Stage
    kind: Kind
    serve: Side
    shadow: Side | None
    replicate: Side | None

    @property
    def writes(self) -> tuple[Side, ...]:
        return (self.serve,) if self.replicate is None else (self.serve, self.replicate)


# The stage table of DESIGN.md, one row per stage:
# (reads served by, shadow-read, writes go to, authoritative for writes)
_TABLE: dict[Stage, tuple[Side, Side | None, tuple[Side, ...], Side]] = {
    Stage.SOURCE: (Side.SOURCE, None, (Side.SOURCE,), Side.SOURCE),
    Stage.DUALWRITE: (Side.SOURCE, None, (Side.SOURCE, Side.TARGET), Side.SOURCE),
    Stage.SHADOW: (Side.SOURCE, Side.TARGET, (Side.SOURCE, Side.TARGET), Side.SOURCE),
    Stage.LIVE: (Side.TARGET, Side.SOURCE, (Side.SOURCE, Side.TARGET), Side.TARGET),
    Stage.RAMPDOWN: (Side.TARGET, None, (Side.SOURCE, Side.TARGET), Side.TARGET),
    Stage.TARGET: (Side.TARGET, None, (Side.TARGET,), Side.TARGET),
}


def authority(stage: Stage) -> Side:
    return _TABLE[stage][3]


def written_sides(stage: Stage) -> tuple[Side, ...]:
    return _TABLE[stage][2]


def plan(stage: Stage, kind: Kind) -> Plan:
    serves, shadow, writes, auth = _TABLE[stage]
    if kind == "read":
        return Plan(stage, kind, serves, shadow, None)
    others = tuple(s for s in writes if s is not auth)
    return Plan(stage, kind, auth, None, others[0] if others else None)


def alters_writes(current: Stage, wanted: Stage) -> bool:
    """A change of authority or of the sides written (it needs the exclusive fence)."""
    return authority(current) != authority(wanted) or written_sides(current) != written_sides(
        wanted
    )
