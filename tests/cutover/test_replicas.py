"""Replicas report, under a lease, the stage version they run: what a flip waits for."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from cutover import replicas
from cutover.fleet import StageView
from cutover.stages import Stage
from cutover.store import StageStore, open_pool
from tests.harness import DATASETS, migrate_state


@pytest.fixture
async def pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    await migrate_state(pg_url)
    opened = await open_pool(pg_url)
    yield opened
    await opened.close()


async def test_a_replica_reports_what_it_runs_and_withdraws_when_it_stops(
    pool: asyncpg.Pool, redis_url: str, redis_prefix: str
) -> None:
    store = StageStore(pool)
    view = StageView(store, redis_url, redis_prefix, 5.0, DATASETS, replica="r1")
    await view.start()
    try:
        row = await store.get("dcir")
        [reported] = await replicas.listing(pool)
        assert (reported.name, reported.versions["dcir"], reported.alive) == (
            "r1",
            row.version,
            True,
        )
        after = await store.change("dcir", row.version, Stage.DUALWRITE, actor="t", reason="t")
        assert await replicas.lagging(pool, "dcir", after.version) == ["r1"]
        await view.reload()  # what a Redis announcement or a poll triggers
        assert await replicas.lagging(pool, "dcir", after.version) == []
        assert await replicas.confirmed(pool, "dcir", after.version, timeout=0.1) == []
    finally:
        await view.stop()
    assert await replicas.listing(pool) == []  # a stopped replica holds no flip up


async def test_a_replica_whose_lease_ran_out_is_not_waited_for(pool: asyncpg.Pool) -> None:
    await replicas.report(pool, "frozen", {"dcir": 1}, lease=0.01)
    await replicas.report(pool, "behind", {"dcir": 1}, lease=30.0)
    assert await replicas.confirmed(pool, "dcir", 2, timeout=0.3) == ["behind"]
    listed = {r.name: r.alive for r in await replicas.listing(pool)}
    assert listed == {"frozen": False, "behind": True}
