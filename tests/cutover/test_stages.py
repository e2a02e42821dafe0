"""Stage moves: forward one at a time, back any number, each refusal naming the legal moves."""

from __future__ import annotations

import itertools

import pytest

from bascule.errors import IllegalMove, UnknownStage
from bascule.stages import ORDER, Stage, check_move, legal_moves


@pytest.mark.parametrize(("current", "wanted"), list(itertools.product(ORDER, ORDER)))
def test_every_pair_of_stages(current: Stage, wanted: Stage) -> None:
    legal = wanted.position == current.position + 1 or wanted.position < current.position
    if legal:
        check_move("dcir", current, wanted)
        assert wanted in legal_moves(current)
    else:
        with pytest.raises(IllegalMove) as info:
            check_move("dcir", current, wanted)
        assert wanted not in legal_moves(current)
        message = str(info.value)
        assert message.startswith(f"dcir: cannot move {current.value} -> {wanted.value}")
        for stage in legal_moves(current):
            assert stage.value in message.split("legal moves from")[1]


def test_skipped_stages_are_named() -> None:
    with pytest.raises(IllegalMove, match=r"one stage at a time \(skips dualwrite, shadow\)"):
        check_move("dcir", Stage.SOURCE, Stage.LIVE)


def test_unknown_stage_lists_the_stages() -> None:
    with pytest.raises(UnknownStage, match="unknown stage 'golive'; the stages are source, dual"):
        Stage.parse("golive")
    assert Stage.parse("live") is Stage.LIVE


def test_legal_moves_from_the_ends() -> None:
    assert legal_moves(Stage.SOURCE) == (Stage.DUALWRITE,)
    assert legal_moves(Stage.TARGET) == (
        Stage.RAMPDOWN,
        Stage.LIVE,
        Stage.SHADOW,
        Stage.DUALWRITE,
        Stage.SOURCE,
    )
