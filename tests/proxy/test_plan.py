"""The plan against the whole stage table (docs/architecture.md), written out again
independently."""

from __future__ import annotations

import pytest

from bascule.stages import Side, Stage, alters_writes
from proxy.plan import plan

S, T = Side.SOURCE, Side.TARGET

# stage: (reads served by, shadow-read, writes go to, authoritative)
TABLE = {
    "source": (S, None, {S}, S),
    "dualwrite": (S, None, {S, T}, S),
    "shadow": (S, T, {S, T}, S),
    "live": (T, S, {S, T}, T),
    "rampdown": (T, None, {S, T}, T),
    "target": (T, None, {T}, T),
}


@pytest.mark.parametrize("stage", list(TABLE))
def test_plan_matches_the_design_table(stage: str) -> None:
    serves, shadow, writes, authority = TABLE[stage]
    read = plan(Stage(stage), "read")
    assert (read.serve, read.shadow, read.replicate) == (serves, shadow, None)
    write = plan(Stage(stage), "write")
    assert write.serve == authority
    assert write.shadow is None  # only reads are ever shadowed
    assert set(write.writes) == writes
    assert write.writes[0] == authority


@pytest.mark.parametrize(
    ("a", "b", "alters"),
    [
        ("source", "dualwrite", True),
        ("dualwrite", "shadow", False),
        ("shadow", "live", True),
        ("live", "rampdown", False),
        ("rampdown", "target", True),
        ("target", "shadow", True),
        ("live", "dualwrite", True),
        ("shadow", "dualwrite", False),
    ],
)
def test_changes_that_alter_writes(a: str, b: str, alters: bool) -> None:
    assert alters_writes(Stage(a), Stage(b)) is alters
    assert alters_writes(Stage(b), Stage(a)) is alters
