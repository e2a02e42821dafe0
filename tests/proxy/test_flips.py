"""Acceptance: flips that are safe under load, with real proxy processes.

100 writers on 10 shared records (and 10 more, each writing then reading a record of its own)
go through two proxy processes while dcir moves shadow -> live -> shadow -> live through the
controller, as `bascule stage`/`rollback` do: the exclusive write fence, the authority-switch
barrier, ids moved past the other side's, replica confirmations.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from decimal import Decimal

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from bascule.config import SwitchSettings
from bascule.stages import Side, Stage
from bascule.state.fleet import RedisAnnouncer
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageStore
from bascule.tasks import spawn
from cutover import controller
from refapi.lab import AUTH
from tests.harness import dcir_record
from tests.world import SHADOWED, MakeWorld, table_digest

pytestmark = [pytest.mark.timeout(240), pytest.mark.xdist_group("fleet")]


@dataclass
class Load:
    statuses: list[int] = field(default_factory=list)
    stale_reads: list[tuple[int, str, str]] = field(default_factory=list)
    """(record, written, read back) where a researcher did not read their own write."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def shared_writer(url: str, n: int, load: Load) -> None:
    rng = random.Random(n)
    async with aiohttp.ClientSession(headers=AUTH) as session:
        while not load.stop.is_set():
            rid = rng.randint(1, 10)
            base = f"{url}/v1/datasets/dcir/records/{rid}"
            if rng.random() < 0.3:
                request = session.put(
                    base, json={"id": rid, **dcir_record(rid, rng.randint(1, 99))}
                )
            else:
                request = session.patch(base, json={"amount": rng.randint(1, 999)})
            async with request as resp:
                await resp.read()
                load.statuses.append(resp.status)
            # Researchers, not a flood: the backlog must be able to get small before a switch
            # (a switch waits for that; under a load the replay cannot follow, it refuses).
            await asyncio.sleep(rng.uniform(0.02, 0.1))


async def own_writer(url: str, rid: int, load: Load) -> None:
    """Writes a record nobody else writes, then reads it back through the same proxy."""
    rng = random.Random(rid)
    base = f"{url}/v1/datasets/dcir/records/{rid}"
    async with aiohttp.ClientSession(headers=AUTH) as session:
        while not load.stop.is_set():
            amount = f"{rng.randint(1, 99999)}.25"
            async with session.patch(base, json={"amount": float(amount)}) as resp:
                await resp.read()
                load.statuses.append(resp.status)
                if resp.status != 200:
                    continue
            async with session.get(base) as resp:
                body = await resp.json()
                load.statuses.append(resp.status)
                seen = str(Decimal(str(body["record"]["amount"])).quantize(Decimal("0.01")))
                if resp.status == 200 and seen != amount:
                    load.stale_reads.append((rid, amount, seen))


async def highest_id(db: str) -> int:
    conn = await asyncpg.connect(db)
    try:
        return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM dcir"))
    finally:
        await conn.close()


async def test_flips_racing_writes_lose_nothing_and_new_ids_never_collide(
    fleet: MakeWorld, redis_url: str, redis_prefix: str
) -> None:
    f = await fleet([None, None], SHADOWED, ids=True)
    world = f
    pool = await open_pool(world.state_db, max_size=4)
    redis = aioredis.Redis.from_url(redis_url)
    store = StageStore(pool)
    await store.close_gap("dcir", Side.TARGET, actor="t", reason="seeded identically")
    switcher = world.switcher(
        pool, SwitchSettings(hold=8.0, small_backlog=500, backlog_wait=30.0, confirm_wait=15.0)
    )
    announcer = RedisAnnouncer(redis, redis_prefix)
    load = Load()
    writers = [
        spawn(shared_writer(f.proxies[n % 2], n, load), name=f"writer {n}") for n in range(100)
    ]
    writers += [
        spawn(own_writer(f.proxies[n % 2], 11 + n, load), name=f"owner {n}") for n in range(10)
    ]
    flips: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    created: list[int] = []
    try:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            for wanted in (Stage.LIVE, Stage.SHADOW, Stage.LIVE):
                await asyncio.sleep(1.5)
                if wanted is Stage.SHADOW:
                    result = await controller.rollback(
                        store,
                        announcer,
                        "dcir",
                        to=wanted,
                        actor="t",
                        reason="t",
                        switcher=switcher,
                    )
                else:
                    result = await controller.move(
                        store, announcer, "dcir", wanted, actor="t", reason="t", switcher=switcher
                    )
                flips.append((wanted.value, result.done, result.lagging))
                # A create right after the flip: an id neither side has ever held.
                before = max(await highest_id(world.source_db), await highest_id(world.target_db))
                async with session.post(
                    f"{f.proxies[1]}/v1/datasets/dcir/records",
                    json=dcir_record(5000 + len(created)),
                ) as resp:
                    assert resp.status == 201, (wanted, resp.status, await resp.text())
                    new_id = (await resp.json())["record"]["id"]
                assert new_id > before, (wanted, new_id, before)
                created.append(new_id)
    finally:
        load.stop.set()
        await asyncio.gather(*writers, return_exceptions=True)
        await redis.aclose()
        await pool.close()

    for stage, done, lagging in flips:
        assert lagging == (), (stage, lagging)
        assert "every live replica confirmed it" in done, (stage, done)
    assert load.stale_reads == [], load.stale_reads[:5]
    # Researchers saw at most brief refusals while a switch held writes: no other error.
    errors = [s for s in load.statuses if s >= 500 and s != 503]
    assert errors == [], sorted(set(errors))
    refused = sum(1 for s in load.statuses if s == 503)
    assert refused <= len(load.statuses) * 0.05, (refused, len(load.statuses))
    assert len(load.statuses) > 500  # the load really ran across the flips
    counts = await world.drained(within=60)
    assert counts.get("dead", 0) == 0 and counts.get("in_doubt", 0) == 0, counts
    assert await table_digest(world.source_db) == await table_digest(world.target_db)
    assert len(set(created)) == 3
