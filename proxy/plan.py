"""Who serves, who is shadowed and who is written, for a stage and a kind of request. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bascule.stages import Side, Stage, authority, serving, shadowed, written

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


def plan(stage: Stage, kind: Kind) -> Plan:
    """The stage table (``bascule/stages.py``, docs/architecture.md) applied to one request."""
    if kind == "read":
        return Plan(stage, kind, serving(stage), shadowed(stage), None)
    auth = authority(stage)
    others = written(stage) - {auth}
    return Plan(stage, kind, auth, None, next(iter(others), None))
