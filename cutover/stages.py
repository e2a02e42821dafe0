"""The cutover stages and which moves between them are legal. Pure: no I/O."""

from __future__ import annotations

import enum

from bascule.errors import BasculeError


class Stage(enum.StrEnum):
    SOURCE = "source"
    DUALWRITE = "dualwrite"
    SHADOW = "shadow"
    LIVE = "live"
    RAMPDOWN = "rampdown"
    TARGET = "target"

    @property
    def index(self) -> int:
        return ORDER.index(self)

    @classmethod
    def parse(cls, text: str) -> Stage:
        try:
            return cls(text)
        except ValueError:
            raise UnknownStage(text) from None


ORDER: tuple[Stage, ...] = tuple(Stage)


class UnknownStage(BasculeError, ValueError):
    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(
            f"unknown stage {text!r}; the stages are {', '.join(s.value for s in ORDER)}"
        )


class IllegalMove(BasculeError, ValueError):
    """A stage change the rules forbid; the message names the legal moves."""

    def __init__(self, dataset: str, current: Stage, wanted: Stage, why: str) -> None:
        self.dataset, self.current, self.wanted = dataset, current, wanted
        legal = ", ".join(s.value for s in legal_moves(current)) or "none"
        super().__init__(
            f"{dataset}: cannot move {current.value} -> {wanted.value}: {why}; "
            f"legal moves from {current.value}: {legal}"
        )


def legal_moves(current: Stage) -> tuple[Stage, ...]:
    """Forward one stage at a time; back any number of stages."""
    i = current.index
    forward = ORDER[i + 1 : i + 2]
    back = tuple(reversed(ORDER[:i]))
    return forward + back


def check_move(dataset: str, current: Stage, wanted: Stage) -> None:
    """Raise :class:`IllegalMove` unless ``current -> wanted`` is legal."""
    if wanted == current:
        raise IllegalMove(dataset, current, wanted, "it is already there")
    if wanted.index > current.index + 1:
        skipped = ", ".join(s.value for s in ORDER[current.index + 1 : wanted.index])
        raise IllegalMove(
            dataset, current, wanted, f"forward moves go one stage at a time (skips {skipped})"
        )


def is_rollback(current: Stage, wanted: Stage) -> bool:
    return wanted.index < current.index


def previous(current: Stage) -> Stage | None:
    return ORDER[current.index - 1] if current.index > 0 else None
