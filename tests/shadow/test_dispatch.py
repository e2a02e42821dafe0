"""Shadow reads through one replica, in process, over the reference API on two databases:
divergence planted straight into the target database is found at its pointers; clean data
gives no mismatch; busy records are skipped as raced, never called divergent."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from bascule.app.replica import Replica
from bascule.config import Secrets
from bascule.stages import Stage
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageStore
from bascule.tasks import spawn
from refapi.seed import seed_database
from shadow.dispatch import Dispatcher
from shadow.ledger import divergence
from tests.conftest import Ground
from tests.harness import (
    AUTH,
    PROXY_ENV,
    migrate_state,
    refapi,
    serve_proxy,
    write_config,
)

pytestmark = pytest.mark.timeout(180)

RULES = """
[datasets.dcir.compare]
ignore = ["/served_at"]
unordered = { "/records" = "id" }
"""


@dataclass
class World:
    proxy: str
    source_db: str
    target_db: str
    state_db: str
    replica: Replica
    started: float

    async def to_stage(self, *stages: Stage, dataset: str = "dcir") -> None:
        pool = await open_pool(self.state_db, max_size=1)
        try:
            store = StageStore(pool)
            for stage in stages:
                row = await store.get(dataset)
                await store.change(dataset, row.version, stage, actor="test", reason="test")
        finally:
            await pool.close()
        await self.replica.view.reload()

    async def settled(self) -> dict[str, int]:
        """Every shadow read done and counted: the ledger's counts since the world began."""
        assert self.replica.shadow is not None
        await self.replica.shadow.join()
        return await self.replica.shadow.ledger.counts("dcir", self.started)

    async def target(self, sql: str, *args: Any, database: str | None = None) -> None:
        conn = await asyncpg.connect(database or self.target_db)
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def mismatches(self) -> list[dict[str, Any]]:
        pool = await open_pool(self.state_db, max_size=1)
        try:
            return await divergence(pool, "dcir")
        finally:
            await pool.close()


def noise_rules(world: World, route: str) -> Any:
    assert isinstance(world.replica.shadow, Dispatcher)
    return world.replica.shadow.rules("dcir", route)


@asynccontextmanager
async def make_world(
    tmp_path: Path,
    make_database: Callable[[str], Awaitable[str]],
    pg_url: str,
    redis_url: str,
    redis_prefix: str,
    *,
    rows: int = 50,
    extra: str = "",
    target_wrap: Callable[[str], Any] | None = None,
    stages: tuple[Stage, ...] = (Stage.DUALWRITE, Stage.SHADOW),
    rules: str = RULES,
    shadow_worker: str = "inline",
) -> AsyncIterator[World]:
    """Two reference APIs over identical seeded databases, a replica, and the proxy in front,
    dcir moved through ``stages``. ``target_wrap`` puts a fault injector before the target."""
    src, tgt = await make_database("src"), await make_database("tgt")
    for db in (src, tgt):
        await seed_database(db, rows, seed=11)
    await migrate_state(pg_url)
    async with AsyncExitStack() as stack:
        source = await stack.enter_async_context(refapi("azure", src))
        target = await stack.enter_async_context(refapi("scaleway", tgt))
        if target_wrap is not None:
            target = await stack.enter_async_context(target_wrap(target))
        config = write_config(
            tmp_path / "bascule.toml",
            source_url=source,
            target_url=target,
            postgres_url=pg_url,
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            extra=rules + extra,
            shadow_worker=shadow_worker,
        )
        secrets = Secrets.from_env({**os.environ, **PROXY_ENV})
        replica = await stack.enter_async_context(Replica(config, secrets, pg_url, redis_url))
        url = await stack.enter_async_context(serve_proxy(replica.server()))
        world = World(url, src, tgt, pg_url, replica, time.time() - 1)
        await world.to_stage(*stages)
        yield world


@pytest.fixture
async def world(
    tmp_path: Path,
    make_database: Callable[[str], Awaitable[str]],
    pg_url: str,
    redis_url: str,
    redis_prefix: str,
) -> AsyncIterator[World]:
    async with make_world(tmp_path, make_database, pg_url, redis_url, redis_prefix) as built:
        yield built


async def get(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status


async def query(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    async with session.post(url, json=body) as resp:
        await resp.read()
        return resp.status


GROUPED = {"group_by": "department", "metrics": ["count", "sum:amount"]}


async def test_planted_divergence_is_found_at_its_pointers(world: World) -> None:
    await planted_divergence_is_found(world)


async def planted_divergence_is_found(world: World) -> None:
    """Clean reads match; a changed field, a missing row, an extra row inside a page and a
    changed aggregate planted in the target are found at their pointers."""
    base = f"{world.proxy}/v1/datasets/dcir"
    async with aiohttp.ClientSession(headers=AUTH) as session:
        # Clean first: the same reads match.
        assert await get(session, f"{base}/records/3") == 200
        assert await get(session, f"{base}/records?limit=100") == 200
        assert await query(session, f"{base}/query", GROUPED) == 200
        counts = await world.settled()
        assert counts["matched"] == 3 and counts["mismatched"] == 0, counts

        # A changed field, a missing row, an extra row inside a page, a changed aggregate.
        await world.target("UPDATE dcir SET amount = amount + 1 WHERE id = 3")
        await world.target("DELETE FROM dcir WHERE id = 7")
        await world.target(
            "INSERT INTO dcir (id, patient_id, act_code, act_date, amount,"
            " prescriber_speciality, department, created_at, updated_at)"
            " SELECT 10001, patient_id, act_code, act_date, amount,"
            " prescriber_speciality, department, created_at, updated_at FROM dcir WHERE id = 9"
        )
        assert await get(session, f"{base}/records/3") == 200
        assert await get(session, f"{base}/records/7") == 200
        assert await get(session, f"{base}/records?limit=100") == 200
        assert await query(session, f"{base}/query", GROUPED) == 200
        counts = await world.settled()
    assert counts["mismatched"] == 4, counts
    assert counts["compared"] == 7, counts
    found = {(m["routes"][0], m["part"], m["pointer"], m["kind"]) for m in await world.mismatches()}
    records, one, q = (
        "/v1/datasets/{dataset}/records",
        "/v1/datasets/{dataset}/records/{id}",
        "/v1/datasets/{dataset}/query",
    )
    assert (one, "body", "/record/amount", "changed") in found  # the changed field
    assert (one, "status", "", "changed") in found  # the missing row, read alone
    assert (records, "body", "/records/2/amount", "changed") in found  # id 3, third in the page
    assert (records, "body", "/records/6", "missing") in found
    # In an unordered array, elements are named by their place among both sides' keys, sorted:
    # id 7 is 7th (index 6), id 10001 the 51st (index 50).
    assert (records, "body", "/records/50", "extra") in found
    # The aggregate: the changed amount and the moved rows change count and sum in groups.
    assert any(r == q and p.endswith("/sum_amount") and k == "changed" for r, _, p, k in found)
    assert any(r == q and p.endswith("/count") and k == "changed" for r, _, p, k in found)


async def test_clean_data_gives_no_mismatch_across_read_endpoints(ground: Ground) -> None:
    # A queue for every read: on a busy machine none is dropped, so all 5000 are compared.
    async with make_world(*ground, extra="[shadow]\nqueue = 6000\n") as world:
        await clean_reads(world)


async def clean_reads(world: World) -> None:
    base = f"{world.proxy}/v1/datasets/dcir"
    rng = random.Random(5)
    bodies: list[dict[str, Any]] = [
        GROUPED,
        {"group_by": None, "metrics": ["count", "avg:amount", "min:amount"]},
        {"group_by": "act_code", "metrics": ["max:amount"], "filters": {"amount": {"gt": 30}}},
    ]
    statuses: list[int] = []

    async def reader(n: int) -> None:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            for i in range(250):
                pick = (n + i) % 4
                if pick == 0:
                    statuses.append(await get(session, f"{base}/records/{rng.randint(1, 60)}"))
                elif pick == 1:
                    page = f"after={rng.randint(0, 40)}&limit={rng.randint(1, 20)}"
                    statuses.append(await get(session, f"{base}/records?{page}"))
                elif pick == 2:
                    statuses.append(await query(session, f"{base}/query", rng.choice(bodies)))
                else:  # a record neither side has: two 404s, equal
                    statuses.append(await get(session, f"{base}/records/{rng.randint(51, 99)}"))

    await asyncio.gather(*(reader(n) for n in range(20)))
    counts = await world.settled()
    assert len(statuses) == 5000 and set(statuses) <= {200, 404}
    assert counts["mismatched"] == 0 and counts["errored"] == 0, counts
    assert counts["dropped"] == 0, counts
    assert counts["compared"] == counts["matched"] == 5000, counts
    assert await world.mismatches() == []


async def test_busy_records_are_skipped_as_raced_and_a_planted_divergence_still_found(
    world: World,
) -> None:
    """50 writers PATCH records 1-5 while every read of records 1-6 is shadowed; record 6,
    never written, differs in the target database."""
    await world.target("UPDATE dcir SET act_code = act_code || 'X' WHERE id = 6")
    base = f"{world.proxy}/v1/datasets/dcir/records"
    done = asyncio.Event()
    writes: list[int] = []
    reads: dict[int, int] = {}

    async def writer(n: int) -> None:
        rng = random.Random(n)
        async with aiohttp.ClientSession(headers=AUTH) as session:
            for _ in range(20):
                rid = rng.randint(1, 5)
                async with session.patch(
                    f"{base}/{rid}", json={"amount": rng.randint(1, 999)}
                ) as resp:
                    await resp.read()
                    writes.append(resp.status)

    async def reader(n: int) -> None:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            i = n
            while not done.is_set():
                rid = i % 6 + 1
                assert await get(session, f"{base}/{rid}") == 200
                reads[rid] = reads.get(rid, 0) + 1
                i += 1

    readers = [spawn(reader(n), name=f"reader-{n}") for n in range(10)]
    await asyncio.gather(*(writer(n) for n in range(50)))
    done.set()
    await asyncio.gather(*readers)
    counts = await world.settled()

    assert writes.count(200) == len(writes) == 1000
    # Every read of record 6 differs at act_code; no read of a busy record is called divergent.
    found = await world.mismatches()
    assert {(m["pointer"], m["kind"]) for m in found} == {("/record/act_code", "changed")}, found
    assert counts["mismatched"] == reads[6], (counts, reads)
    # Reads of busy records raced writes: skipped and counted, never mismatched; quiet moments
    # still compared them.
    assert counts["skipped_raced"] > 0, counts
    assert counts["compared"] + counts["skipped_raced"] + counts["skipped_lagging"] == sum(
        reads.values()
    ), (counts, reads)
    assert counts["errored"] == counts["dropped"] == 0, counts


NOISY = """
[defaults]
noise_sample = 1.0
noise_pairs = 3

[datasets.dcir.compare]
unordered = { "/records" = "id" }
"""


async def test_noise_is_learned_under_patches_never_the_patched_field(ground: Ground) -> None:
    """No rule ignores the volatile ``served_at``: the serving side, asked twice with no write
    in between, teaches it. Writers PATCH ``amount`` of records 1-5 meanwhile: never proposed.
    Record 6's amount differs in the target: a mismatch, never noise."""
    async with make_world(*ground, rules=NOISY) as world:
        await world.target("UPDATE dcir SET amount = amount + 1 WHERE id = 6")
        base = f"{world.proxy}/v1/datasets/dcir/records"
        done = asyncio.Event()

        async def writer(n: int) -> None:
            rng = random.Random(n)
            async with aiohttp.ClientSession(headers=AUTH) as session:
                for _ in range(40):
                    rid = rng.randint(1, 5)
                    async with session.patch(
                        f"{base}/{rid}", json={"amount": rng.randint(1, 999)}
                    ) as resp:
                        assert resp.status == 200
                    await asyncio.sleep(rng.random() * 0.05)

        async def reader(n: int) -> None:
            async with aiohttp.ClientSession(headers=AUTH) as session:
                i = n
                while not done.is_set():
                    path = f"{base}/{i % 6 + 1}" if i % 3 else f"{base}?limit=10"
                    assert await get(session, path) == 200
                    i += 1

        readers = [spawn(reader(n), name=f"reader-{n}") for n in range(4)]
        await asyncio.gather(*(writer(n) for n in range(5)))
        await asyncio.sleep(1.0)  # a quiet second: pages (any write races them) pair up too
        done.set()
        await asyncio.gather(*readers)
        counts = await world.settled()
        assert isinstance(world.replica.shadow, Dispatcher) and world.replica.shadow.noise
        noise = world.replica.shadow.noise
        proposed = {(p["route"], p["pointer"], p["rule"]) for p in await noise.proposals("dcir", 3)}
        one, page = "/v1/datasets/{dataset}/records/{id}", "/v1/datasets/{dataset}/records"
        assert (one, "/served_at", "ignore") in proposed, proposed
        assert (page, "/served_at", "ignore") in proposed, proposed
        assert not any("amount" in p or "updated_at" in p for _, p, _ in proposed), proposed
        # The planted divergence is counted as a mismatch at its pointer.
        found = {(m["pointer"], m["kind"]) for m in await world.mismatches()}
        assert ("/record/amount", "changed") in found, found
        assert counts["mismatched"] > 0

        # Accepted, the rule reaches the replica (Redis), and clean reads match again.
        await noise.decide("dcir", "/served_at", True, "volatile by design", "test", min_pairs=3)
        deadline = time.monotonic() + 5
        while noise_rules(world, one).ignore == ():
            assert time.monotonic() < deadline, "the accepted rule never reached the replica"
            await asyncio.sleep(0.05)
        before = await world.settled()
        async with aiohttp.ClientSession(headers=AUTH) as session:
            for rid in (7, 8, 9):
                assert await get(session, f"{base}/{rid}") == 200
        after = await world.settled()
        assert after["matched"] - before["matched"] == 3, (before, after)


async def test_in_live_the_source_is_shadowed(ground: Ground) -> None:
    """In `live` the target serves and the source is shadow-read: a divergence planted in the
    source is found; the researcher got the target's answer."""
    async with make_world(
        *ground,
        stages=(Stage.DUALWRITE, Stage.SHADOW, Stage.LIVE),
    ) as world:
        await world.target("UPDATE dcir SET amount = 1234.5 WHERE id = 2", database=world.source_db)
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.get(f"{world.proxy}/v1/datasets/dcir/records/2") as resp:
                assert resp.headers["X-Served-By"] == "scaleway"
                assert (await resp.json())["record"]["amount"] != 1234.5
            assert await get(session, f"{world.proxy}/v1/datasets/dcir/records/3") == 200
        counts = await world.settled()
        found = await world.mismatches()
    assert (counts["matched"], counts["mismatched"]) == (1, 1), counts
    assert [(m["pointer"], m["kind"]) for m in found] == [("/record/amount", "changed")]
