"""The cutover stages and which moves between them are legal. Pure: no I/O."""

from __future__ import annotations

import enum

from bascule.errors import IllegalMove as _IllegalMove
from bascule.errors import UnknownStage


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
