"""Shadow reads through one replica, in process, over the reference API on two databases:
divergence planted straight into the target database is found at its pointers; clean data
gives no mismatch; busy records are skipped as raced, never called divergent."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from bascule.tasks import spawn
from refapi.lab import AUTH
from shadow.dispatch import Dispatcher
from tests.conftest import Ground
from tests.world import GROUPED, LIVE, World, get, planted_divergence_is_found, query, shadow_world

pytestmark = pytest.mark.timeout(180)


def noise_rules(world: World, route: str) -> Any:
    assert isinstance(world.replica.shadow, Dispatcher)
    return world.replica.shadow.rules("dcir", route)


@pytest.fixture
async def world(ground: Ground) -> AsyncIterator[World]:
    async with shadow_world(ground) as built:
        yield built


async def test_planted_divergence_is_found_at_its_pointers(world: World) -> None:
    await planted_divergence_is_found(world)


async def test_clean_data_gives_no_mismatch_across_read_endpoints(ground: Ground) -> None:
    # A queue for every read: on a busy machine none is dropped, so all 5000 are compared.
    async with shadow_world(ground, extra="[shadow]\nqueue = 6000\n") as world:
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
    await world.sql(world.target_db, "UPDATE dcir SET act_code = act_code || 'X' WHERE id = 6")
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
    assert counts["mismatched"] == reads[6], f"{dict(counts)} {reads}"
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
    async with shadow_world(ground, rules=NOISY) as world:
        await world.sql(world.target_db, "UPDATE dcir SET amount = amount + 1 WHERE id = 6")
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
    async with shadow_world(
        ground,
        stages=LIVE,
    ) as world:
        await world.sql(world.source_db, "UPDATE dcir SET amount = 1234.5 WHERE id = 2")
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.get(f"{world.proxy}/v1/datasets/dcir/records/2") as resp:
                assert resp.headers["X-Served-By"] == "scaleway"
                assert (await resp.json())["record"]["amount"] != 1234.5
            assert await get(session, f"{world.proxy}/v1/datasets/dcir/records/3") == 200
        counts = await world.settled()
        found = await world.mismatches()
    assert (counts["matched"], counts["mismatched"]) == (1, 1), counts
    assert [(m["pointer"], m["kind"]) for m in found] == [("/record/amount", "changed")]
