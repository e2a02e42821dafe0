"""Dual write with real proxy processes: many writers through two replicas, and a replica
killed (SIGKILL) between the backend's answer and the journal's outcome."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bascule.procs import ServerProcess
from cutover.stages import Stage
from cutover.store import StageStore, open_pool
from refapi.seed import seed_database
from tests.harness import (
    AUTH,
    PROXY_ENV,
    dcir_record,
    migrate_state,
    refapi,
    start_proxy,
    write_config,
)
from tests.proxy.test_dualwrite import World, researchers, table_digest

pytestmark = pytest.mark.timeout(180)


@dataclass
class Fleet:
    world: World
    urls: list[str]
    procs: list[ServerProcess]


@pytest.fixture
async def fleet(
    tmp_path: Path,
    make_database: Callable[[str], Awaitable[str]],
    pg_url: str,
    redis_url: str,
    redis_prefix: str,
) -> AsyncIterator[Callable[..., Awaitable[Fleet]]]:
    async with AsyncExitStack() as stack:

        async def make(failpoints: list[str | None]) -> Fleet:
            src, tgt = await make_database("src"), await make_database("tgt")
            for db in (src, tgt):
                await seed_database(db, 30, seed=11)
            await migrate_state(pg_url)
            # The source ignores idempotency keys: a re-sent write would apply twice there.
            source = await stack.enter_async_context(refapi("azure", src, honour_idempotency=False))
            target = await stack.enter_async_context(refapi("scaleway", tgt))
            config = tmp_path / "bascule.toml"
            write_config(
                config,
                source_url=source,
                target_url=target,
                postgres_url=pg_url,
                redis_url=redis_url,
                redis_prefix=redis_prefix,
                read_timeout=2.0,
            )
            urls, procs = [], []
            for i, failpoint in enumerate(failpoints):
                env = dict(PROXY_ENV)
                if failpoint:
                    env["BASCULE_FAILPOINT"] = failpoint
                started = await start_proxy(stack, config, tmp_path / f"proxy{i}.log", env)
                urls.append(started.url)
                procs.append(started.proc)
            pool = await open_pool(pg_url, max_size=1)
            try:
                store = StageStore(pool)
                row = await store.get("dcir")
                await store.change("dcir", row.version, Stage.DUALWRITE, actor="t", reason="t")
            finally:
                await pool.close()
            await asyncio.sleep(1.0)  # every replica polls the new stage
            world = World(urls[0], src, tgt, pg_url, None)  # type: ignore[arg-type]
            return Fleet(world, urls, procs)

        yield make


async def test_200_writers_through_two_replicas_leave_identical_databases(
    fleet: Callable[..., Awaitable[Fleet]],
) -> None:
    f = await fleet([None, None])
    statuses = await researchers(f.urls, writers=200, ops=5, records=20)
    assert not [s for s in statuses if s >= 500], sorted(set(statuses))
    counts = await f.world.drained(within=60)
    assert counts.get("dead", 0) == 0 and counts.get("in_doubt", 0) == 0, counts
    assert await table_digest(f.world.source_db) == await table_digest(f.world.target_db)
    # No record value, body or researcher token in any replica's log.
    for proc in f.procs:
        log = proc.log_tail(10**7)
        assert "Bearer" not in log and "patient_id" not in log and '"amount"' not in log


async def test_a_replica_killed_after_the_backend_answered_loses_nothing(
    fleet: Callable[..., Awaitable[Fleet]],
) -> None:
    f = await fleet(["kill-after-send:PATCH", None])
    killer, survivor = f.urls
    got_2xx: list[int] = []
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.put(
            f"{survivor}/v1/datasets/dcir/records/4", json={"id": 4, **dcir_record(4, 1.0)}
        ) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientError):
            # The source applies the PATCH; the replica dies before journaling the outcome.
            async with session.patch(
                f"{killer}/v1/datasets/dcir/records/4", json={"amount": 555}
            ) as resp:
                await resp.read()
        assert f.procs[0].proc is not None
        await asyncio.wait_for(f.procs[0].proc.wait(), 10)
        # Writes go on through the other replica, to the same record too.
        for amount in (600, 601):
            async with session.patch(
                f"{survivor}/v1/datasets/dcir/records/4", json={"amount": amount}
            ) as resp:
                assert resp.status == 200
                got_2xx.append(amount)
    # The orphan is settled once its call can no longer be in flight (read_timeout + margin).
    deadline = asyncio.get_running_loop().time() + 40
    while True:
        counts = await f.world.drained(within=40)
        if not counts.get("in_doubt") and not counts.get("intent"):
            break
        assert asyncio.get_running_loop().time() < deadline, counts
        await asyncio.sleep(0.5)
    assert counts.get("dead", 0) == 0, counts
    assert await table_digest(f.world.source_db) == await table_digest(f.world.target_db)
    import asyncpg

    for db in (f.world.source_db, f.world.target_db):
        conn = await asyncpg.connect(db)
        try:
            assert float(await conn.fetchval("SELECT amount FROM dcir WHERE id = 4")) == 601.0
        finally:
            await conn.close()
    assert os.environ.get("BASCULE_FAILPOINT") is None  # never leaks into the test process
