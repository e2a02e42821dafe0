"""Replicas report, under a lease, the stage version they run: what a flip waits for."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import orjson

from bascule.stages import Stage
from bascule.state import replicas
from bascule.state.fleet import StageView
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageStore
from refapi.lab import DATASETS, migrate_state
from tests.harness import cli_env, run_cli


async def test_a_replica_reports_what_it_runs_and_withdraws_when_it_stops(
    state_pool: asyncpg.Pool, redis_url: str, redis_prefix: str
) -> None:
    store = StageStore(state_pool)
    view = StageView(store, redis_url, redis_prefix, 5.0, DATASETS, replica="r1")
    await view.start()
    try:
        row = await store.get("dcir")
        [reported] = await replicas.listing(state_pool)
        assert (reported.name, reported.versions["dcir"], reported.alive) == (
            "r1",
            row.version,
            True,
        )
        after = await store.change("dcir", row.version, Stage.DUALWRITE, actor="t", reason="t")
        assert await replicas.lagging(state_pool, "dcir", after.version) == ["r1"]
        await view.reload()  # what a Redis announcement or a poll triggers
        assert await replicas.lagging(state_pool, "dcir", after.version) == []
        assert await replicas.confirmed(state_pool, "dcir", after.version, timeout=0.1) == []
    finally:
        await view.stop()
    assert await replicas.listing(state_pool) == []  # a stopped replica holds no flip up


async def test_a_replica_whose_lease_ran_out_is_not_waited_for(state_pool: asyncpg.Pool) -> None:
    await replicas.report(state_pool, "frozen", {"dcir": 1}, lease=0.01)
    await replicas.report(state_pool, "behind", {"dcir": 1}, lease=30.0)
    assert await replicas.confirmed(state_pool, "dcir", 2, timeout=0.3) == ["behind"]
    listed = {r.name: r.alive for r in await replicas.listing(state_pool)}
    assert listed == {"frozen": False, "behind": True}


def test_status_shows_each_replica_and_the_version_it_runs(
    tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str
) -> None:
    env = cli_env(tmp_path, pg_url, redis_url, redis_prefix)

    async def report() -> None:
        await migrate_state(pg_url)
        conn_pool = await open_pool(pg_url, max_size=1)
        try:
            await replicas.report(conn_pool, "eu-west-1a:4242", {"dcir": 1, "pmsi": 1}, 30.0)
            await replicas.report(conn_pool, "eu-west-1b:77", {"dcir": 0}, 30.0)
        finally:
            await conn_pool.close()

    asyncio.run(report())
    status = orjson.loads(run_cli(env, "status", "--json").stdout)
    listed = {r["name"]: r["versions"] for r in status["replicas"]}
    assert listed == {"eu-west-1a:4242": {"dcir": 1, "pmsi": 1}, "eu-west-1b:77": {"dcir": 0}}
    table = run_cli(env, "status", "dcir").stdout
    assert "eu-west-1a:4242" in table and "(behind)" in table
