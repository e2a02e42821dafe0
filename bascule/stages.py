"""The cutover stages, which moves between them are legal, and the gap rule. Pure: no I/O."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import UTC, datetime

from bascule.errors import IllegalMove as _IllegalMove
from bascule.errors import Refused as _Refused
from bascule.errors import UnknownStage
from bascule.errors import UsageError as _UsageError


class Stage(enum.StrEnum):
    SOURCE = "source"
    DUALWRITE = "dualwrite"
    SHADOW = "shadow"
    LIVE = "live"
    RAMPDOWN = "rampdown"
    TARGET = "target"

    @property
    def position(self) -> int:
        return ORDER.index(self)

    @classmethod
    def parse(cls, text: str) -> Stage:
        try:
            return cls(text)
        except ValueError:
            raise UnknownStage(text, [s.value for s in ORDER]) from None


ORDER: tuple[Stage, ...] = tuple(Stage)


def illegal(dataset: str, current: Stage, wanted: Stage, why: str) -> _IllegalMove:
    """An IllegalMove whose message names the legal moves."""
    legal = ", ".join(s.value for s in legal_moves(current)) or "none"
    return _IllegalMove(
        f"{dataset}: cannot move {current.value} -> {wanted.value}: {why}; "
        f"legal moves from {current.value}: {legal}",
        dataset,
        current.value,
        wanted.value,
    )


def legal_moves(current: Stage) -> tuple[Stage, ...]:
    """Forward one stage at a time; back any number of stages."""
    i = current.position
    forward = ORDER[i + 1 : i + 2]
    back = tuple(reversed(ORDER[:i]))
    return forward + back


def check_move(dataset: str, current: Stage, wanted: Stage) -> None:
    """Raise :class:`~bascule.errors.IllegalMove` unless ``current -> wanted`` is legal."""
    if wanted == current:
        raise illegal(dataset, current, wanted, "it is already there")
    if wanted.position > current.position + 1:
        skipped = ", ".join(s.value for s in ORDER[current.position + 1 : wanted.position])
        raise illegal(
            dataset, current, wanted, f"forward moves go one stage at a time (skips {skipped})"
        )


def is_rollback(current: Stage, wanted: Stage) -> bool:
    return wanted.position < current.position


def previous(current: Stage) -> Stage | None:
    return ORDER[current.position - 1] if current.position > 0 else None


# --- sides: who serves, is compared, is written, is authoritative in each stage -----------------


class Side(enum.StrEnum):
    SOURCE = "source"
    TARGET = "target"

    @classmethod
    def parse(cls, text: str) -> Side:
        try:
            return cls(text)
        except ValueError:
            raise _UsageError(f"unknown side {text!r}; the sides are source, target") from None


_S, _T = Side.SOURCE, Side.TARGET

# The stage table (docs/architecture.md): (reads served by, shadow-read, writes go to,
# authoritative).
_ROLES: dict[Stage, tuple[Side, Side | None, frozenset[Side], Side]] = {
    Stage.SOURCE: (_S, None, frozenset({_S}), _S),
    Stage.DUALWRITE: (_S, None, frozenset({_S, _T}), _S),
    Stage.SHADOW: (_S, _T, frozenset({_S, _T}), _S),
    Stage.LIVE: (_T, _S, frozenset({_S, _T}), _T),
    Stage.RAMPDOWN: (_T, None, frozenset({_S, _T}), _T),
    Stage.TARGET: (_T, None, frozenset({_T}), _T),
}


def serving(stage: Stage) -> Side:
    """The side that answers reads."""
    return _ROLES[stage][0]


def shadowed(stage: Stage) -> Side | None:
    """The side shadow-read and compared, if any."""
    return _ROLES[stage][1]


def authority(stage: Stage) -> Side:
    return _ROLES[stage][3]


def written(stage: Stage) -> frozenset[Side]:
    return _ROLES[stage][2]


def alters_writes(current: Stage, wanted: Stage) -> bool:
    """Does ``current -> wanted`` change who is authoritative or which sides are written?

    Such a change takes the dataset's write fence exclusively and bumps its write epoch:
    ``source <-> dualwrite``, ``shadow <-> live``, ``rampdown <-> target``, and any rollback
    that jumps across one of them.
    """
    return authority(current) != authority(wanted) or written(current) != written(wanted)


def switches_authority(current: Stage, wanted: Stage) -> bool:
    """The authority switch (``shadow <-> live``, or a rollback across it): a write barrier."""
    return authority(current) != authority(wanted)


def role(side: Side, stage: Stage) -> str:
    """What ``side`` does in ``stage``, in words for an SRE."""
    serves, shadowed, writes, auth = _ROLES[stage]
    parts = []
    if serves is side:
        parts.append("serve reads")
    if auth is side:
        parts.append("be authoritative for writes")
    if shadowed is side:
        parts.append("be shadow-read and compared")
    if not parts:
        parts.append("only receive replayed writes" if side in writes else "receive nothing")
    return " and ".join(parts)


# --- gaps: a side that missed writes ---------------------------------------------------------

# The stages in which a side with a gap must not be: where it serves reads or is authoritative
# for writes, and, for the target, `shadow`, whose comparisons are the gate's evidence that the
# target may serve (comparing against a side known to have missed writes proves nothing). The
# source's shadow-read in `live` does not count: rolling back from `target` passes through
# `rampdown` and `live` while the source catches up, and only becoming authoritative again
# (`shadow`) needs its gap closed. See docs/decisions.md.
EXPOSED: dict[Side, frozenset[Stage]] = {
    Side.SOURCE: frozenset({Stage.SOURCE, Stage.DUALWRITE, Stage.SHADOW}),
    Side.TARGET: frozenset({Stage.SHADOW, Stage.LIVE, Stage.RAMPDOWN, Stage.TARGET}),
}


def opens_gaps(current: Stage, wanted: Stage) -> frozenset[Side]:
    """The sides that start missing writes on entering ``wanted``: the source on entering
    ``target``, the target on entering ``source`` (a rollback all the way)."""
    if wanted == current:
        return frozenset()
    return frozenset(side for side in Side if side not in written(wanted))


def resumes_writes(current: Stage, wanted: Stage) -> frozenset[Side]:
    """The sides that start receiving writes again on entering ``wanted`` (the target on
    ``source -> dualwrite``, the source on a rollback out of ``target``). What a side held
    before proves nothing about the writes it missed meanwhile: a verification counts for the
    gate only if it began reading after the side was written again."""
    if wanted == current:
        return frozenset()
    return frozenset(written(wanted) - written(current))


def blocking_gaps(wanted: Stage, gaps: Mapping[Side, datetime]) -> dict[Side, datetime]:
    """The open gaps that forbid entering ``wanted`` (empty: the gap rule allows it)."""
    return {side: since for side, since in gaps.items() if wanted in EXPOSED[side]}


def when(at: datetime) -> str:
    """A compact UTC time for messages."""
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


class GapOpen(_Refused):
    """A move that would expose a side with an open gap. Nothing changed. ``why``: the gaps
    and what each side would do, without the how-to-proceed of the message."""

    def __init__(
        self, dataset: str, current: Stage, wanted: Stage, gaps: Mapping[Side, datetime]
    ) -> None:
        self.dataset, self.current, self.wanted = dataset, current, wanted
        self.gaps = dict(gaps)
        self.why = why = "; ".join(
            f"the {side.value} has had an open gap since {when(since)} (it may be missing "
            f"writes: nothing has verified it since) and in {wanted.value} it would "
            f"{role(side, wanted)}"
            for side, since in sorted(self.gaps.items())
        )
        close = " and ".join(
            f"`bascule gap close {dataset} {side.value} --reason TEXT`" for side in sorted(gaps)
        )
        super().__init__(
            f"{dataset}: cannot move {current.value} -> {wanted.value}: {why}; once it is "
            f"verified, close the gap with {close}, or override with `--force --reason TEXT` "
            "(audited)"
        )


def check_gap_close(dataset: str, side: Side, stage: Stage, since: datetime | None) -> None:
    """A gap may be closed only if it is open, and only while writes reach that side: closed
    in a stage that does not write it, it would be wrong again at the next write."""
    if since is None:
        raise _Refused(f"{dataset}: the {side.value} has no open gap; there is nothing to close")
    if side not in written(stage):
        raise _Refused(
            f"{dataset}: the {side.value}'s gap (open since {when(since)}) cannot be closed in "
            f"{stage.value}: writes do not reach the {side.value} in {stage.value}, so it would "
            f"miss the next one; move to a stage that writes both sides first"
        )
