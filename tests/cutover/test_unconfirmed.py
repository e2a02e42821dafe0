"""A flip names every replica seen lately that does not run it, a cut-off one included (issue 16,
item 5).

A replica cut off from the state Postgres stops renewing its lease, so a flip no longer waits
for it: that is right, its writes cannot go through. But it keeps serving reads on the stages
it last read, and the flip said "every live replica confirmed it". Now the flip's result names
each replica that reported in the last ``[switch] seen_within`` seconds and has not confirmed,
with its last report and when its stages go stale (``[state] stale_after``: it reports not
ready then); the plain-text CLI prints the steps the move took and those replicas.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import orjson

from bascule.config import SwitchSettings
from bascule.stages import Stage
from bascule.state import replicas
from bascule.state.stage_store import StageStore
from cutover.switch import Switcher
from tests.cutover.test_switch import committing
from tests.harness import cli_env, run_cli

QUICK = SwitchSettings(hold=1.0, small_backlog=10, backlog_wait=1.0, confirm_wait=1.0)


async def reported(
    pool: asyncpg.Pool, name: str, version: int, *, lease: float, ago: float = 0.0
) -> None:
    """``name`` reported running ``version`` of dcir ``ago`` seconds back, for ``lease``."""
    await replicas.report(pool, name, {"dcir": version}, lease)
    await pool.execute(
        "UPDATE bascule_replica SET seen_at = now() - make_interval(secs => $2),"
        " expires_at = now() - make_interval(secs => $2) + make_interval(secs => $3)"
        " WHERE name = $1",
        name,
        ago,
        lease,
    )


async def test_a_change_names_replicas_whose_lease_ran_out_and_when_they_go_stale(
    state_pool: asyncpg.Pool,
) -> None:
    store = StageStore(state_pool)
    row = await store.get("dcir")
    await reported(state_pool, "cut-off", row.version, lease=2.0, ago=10.0)  # lease ran out
    await reported(state_pool, "stale", row.version, lease=2.0, ago=45.0)  # past stale_after
    await reported(state_pool, "gone-long-ago", row.version, lease=2.0, ago=1200.0)
    switcher = Switcher(state_pool, QUICK, stale_after=30.0)
    after, outcome = await switcher.change(
        "dcir", row, Stage.DUALWRITE, committing(store, row, Stage.DUALWRITE)
    )
    # Both are named; the one not seen for 20 minutes is not (it is gone, not behind).
    assert outcome.lagging == ["cut-off", "stale"], outcome.lagging
    assert "every live replica confirmed it" not in outcome.steps
    named = {r["name"]: r for r in outcome.unconfirmed}
    cut = named["cut-off"]
    assert (cut["version"], cut["lease_alive"]) == (row.version, False), cut
    assert 19.0 <= cut["stale_in_seconds"] <= 20.5, cut  # 30 s after its last report
    assert named["stale"]["stale_in_seconds"] < 0, named["stale"]
    said = outcome.steps[-1]
    assert "have not confirmed it: cut-off (its lease ran out), stale" in said, said

    # A replica that stopped cleanly withdrew its report, one not seen for long is gone: the
    # next change names neither.
    await replicas.withdraw(state_pool, "stale")
    await reported(state_pool, "cut-off", after.version, lease=2.0, ago=1200.0)
    _, outcome = await switcher.change(
        "dcir", after, Stage.SOURCE, committing(store, after, Stage.SOURCE)
    )
    assert (outcome.lagging, outcome.steps[-1]) == ([], "every live replica confirmed it")


async def test_the_cli_prints_the_steps_taken_and_the_replicas_behind(
    state_pool: asyncpg.Pool, pg_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    row = await StageStore(state_pool).get("dcir")
    await reported(state_pool, "cut-off", row.version, lease=2.0, ago=10.0)
    env = cli_env(tmp_path, pg_url, redis_url, redis_prefix)
    done = run_cli(env, "stage", "dcir", "dualwrite", "--reason", "CHG-1 start", "--by", "sre")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "dcir: source -> dualwrite" in out, out
    assert "steps taken:" in out and "took the write fence" in out, out
    assert "committed dualwrite" in out, out
    assert f"replicas that have not confirmed version {row.version + 1}:" in out, out
    assert "cut-off: runs version 1; last report" in out, out
    assert "its lease ran out" in out and "until its stages go stale in" in out, out
    # The same in the machine output.
    back = run_cli(env, "rollback", "dcir", "--reason", "back", "--by", "sre", "--json")
    assert back.returncode == 0, back.stderr
    result = orjson.loads(back.stdout)
    assert result["lagging_replicas"] == ["cut-off"], result
    assert result["unconfirmed_replicas"][0]["lease_alive"] is False, result
