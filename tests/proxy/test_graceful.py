"""Acceptance: where it runs (issue 18, items 2 and 3).

- SIGTERM to one of two replicas under a mixed load of reads and writes behind a load balancer
  that polls ``/readyz`` (tests/balancer.py): no researcher request fails, the replica exits 0,
  and no acknowledged write is missing on either side.
- ``bascule proxy --workers 2``: a worker killed with SIGKILL (the failpoint, after the backend
  applied its write and before the journal heard of it; then from outside, under load) is
  started again; its writes in flight are settled by the resolver, none lost.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import aiohttp
import orjson
import pytest

from bascule.stages import Stage
from bascule.tasks import spawn
from refapi.lab import AUTH
from tests.balancer import balancer
from tests.conftest import Ground
from tests.harness import dcir_record, fetch
from tests.world import World, build_world, table_digest

# The heavy fleet tests share one worker: two at once would exceed the server's connections.
pytestmark = [pytest.mark.timeout(150), pytest.mark.xdist_group("fleet")]

ROWS = 30


@dataclass
class Seen:
    """What the researchers saw: statuses, requests with no HTTP answer, and per record the
    amounts acknowledged (2xx) and those whose write got no answer, in the order sent."""

    statuses: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    acked: dict[int, list[int]] = field(default_factory=dict)
    unanswered: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    """Per record: (how many were acknowledged before it, the amount) of each lost answer."""
    created: list[int] = field(default_factory=list)


async def mixed_load(
    url: str, stop: asyncio.Event, seen: Seen, *, writers: int, readers: int, creates: bool
) -> None:
    """``writers`` researchers each PUT their own record (ids 1..writers) with a rising
    amount, one write at a time (and, with ``creates``, a create every fourth write);
    ``readers`` read records and pages. Every request on a kept-alive session."""

    async def writer(n: int) -> None:
        rid = n + 1
        seen.acked[rid], seen.unanswered[rid] = [], []
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(headers=AUTH, timeout=timeout) as session:
            i = 0
            while not stop.is_set():
                i += 1
                amount = 1000 * n + i
                try:
                    if creates and i % 4 == 0:
                        async with session.post(
                            f"{url}/v1/datasets/dcir/records", json=dcir_record(500 + n, amount)
                        ) as resp:
                            body = await resp.json(content_type=None)
                            seen.statuses.append(resp.status)
                            if resp.status == 201:
                                seen.created.append(int(body["record"]["id"]))
                        continue
                    async with session.put(
                        f"{url}/v1/datasets/dcir/records/{rid}",
                        json={"id": rid, **dcir_record(rid, amount)},
                    ) as resp:
                        await resp.read()
                        seen.statuses.append(resp.status)
                        if 200 <= resp.status < 300:
                            seen.acked[rid].append(amount)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    seen.failures.append(type(exc).__name__)
                    seen.unanswered[rid].append((len(seen.acked[rid]), amount))

    async def reader(n: int) -> None:
        rng = random.Random(n)
        async with aiohttp.ClientSession(headers=AUTH) as session:
            while not stop.is_set():
                rid = rng.randint(1, ROWS)
                target = f"records/{rid}" if rng.random() < 0.7 else "records?limit=5"
                try:
                    async with session.get(f"{url}/v1/datasets/dcir/{target}") as resp:
                        await resp.read()
                        seen.statuses.append(resp.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    seen.failures.append(type(exc).__name__)

    await asyncio.gather(*(writer(n) for n in range(writers)), *(reader(n) for n in range(readers)))


async def nothing_acknowledged_is_missing(world: World, seen: Seen) -> None:
    """Both sides identical, each record at its last acknowledged amount, or at the amount of
    a write sent after it whose answer was lost (the backend may have applied it), and every
    acknowledged create on both sides."""
    assert await table_digest(world.source_db) == await table_digest(world.target_db)
    rows = await fetch(world.source_db, "SELECT id, amount FROM dcir")
    amounts = {r["id"]: r["amount"] for r in rows}
    for rid, acked in seen.acked.items():
        allowed = {Decimal(a) for n, a in seen.unanswered[rid] if n == len(acked)}
        if acked:
            allowed.add(Decimal(acked[-1]))
        assert not allowed or amounts[rid] in allowed, (rid, amounts[rid], acked[-3:])
    assert set(seen.created) <= amounts.keys()


async def settled(world: World, within: float) -> dict[str, int]:
    """Wait until no journal entry is open (intent, pending, in doubt): the journal's counts."""
    deadline = time.monotonic() + within
    while True:
        counts = await world.drained(within=within)
        if not counts.get("in_doubt") and not counts.get("intent"):
            return counts
        assert time.monotonic() < deadline, counts
        await asyncio.sleep(0.5)


def replica_pids(world: World) -> set[int]:
    """The process ids of the live replicas `bascule status` lists (named host:pid)."""
    done = world.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    listed = orjson.loads(done.stdout)["replicas"]
    return {int(r["name"].rsplit(":", 1)[1]) for r in listed if r["alive"]}


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


# --- SIGTERM behind a load balancer ------------------------------------------------------------


async def test_sigterm_to_one_replica_behind_a_balancer_fails_no_request(ground: Ground) -> None:
    async with build_world(
        ground,
        replicas=2,
        processes=True,
        stages=(Stage.DUALWRITE,),
        rows=ROWS,
        seed=11,
        read_timeout=2.0,
        prestop_seconds=1.5,
    ) as world:
        async with balancer(world.proxies, world.admin_urls, every=0.2) as lb:
            while not all(lb.ready):
                await asyncio.sleep(0.05)
            stop, seen = asyncio.Event(), Seen()
            load = spawn(
                mixed_load(lb.url, stop, seen, writers=16, readers=8, creates=True), name="load"
            )
            try:
                await asyncio.sleep(1.5)
                stopping = world.procs[0]
                assert stopping.proc is not None
                before = len(seen.statuses)
                stopping.signal(signal.SIGTERM)
                async with asyncio.timeout(30):
                    code = await stopping.proc.wait()
                await asyncio.sleep(1.0)  # and the survivor carries on alone
            finally:
                stop.set()
                await load
        assert code == 0, stopping.log_tail()
        assert seen.failures == [], (seen.failures[:5], stopping.log_tail())
        assert set(seen.statuses) <= {200, 201}, sorted(set(seen.statuses))
        assert len(seen.statuses) > before + 50 and lb.sent[0] > 0 and lb.sent[1] > 0
        log = stopping.log_tail(10**6)
        assert "SIGTERM: not ready; serving new requests for 1.5 s more" in log, log[-2000:]
        assert "requests in flight finished" in log
        counts = await settled(world, within=60)
        assert not counts.get("dead"), counts
        await nothing_acknowledged_is_missing(world, seen)


# --- Workers -----------------------------------------------------------------------------------


async def test_a_killed_worker_is_restarted_and_its_writes_are_settled(ground: Ground) -> None:
    async with build_world(
        ground,
        replicas=1,
        processes=True,
        workers=2,
        stages=(Stage.DUALWRITE,),
        rows=ROWS,
        seed=11,
        read_timeout=2.0,
        source_idem=False,  # a write re-sent to the source would apply twice: never re-sent
        failpoints=["kill-after-send:PATCH"],
    ) as world:
        parent = world.procs[0].proc
        assert parent is not None
        first = children(parent.pid)
        assert len(first) == 2
        url = world.proxy
        async with aiohttp.ClientSession(headers=AUTH) as session:
            # Each worker is a replica of its own in `bascule status`, once started.
            deadline = time.monotonic() + 20
            while not first <= replica_pids(world):
                assert time.monotonic() < deadline, replica_pids(world)
                await asyncio.sleep(0.1)

            # The worst moment: the source applied the PATCH, the worker dies before its
            # outcome is journaled (the intent is orphaned).
            with pytest.raises(aiohttp.ClientError):
                async with session.patch(
                    f"{url}/v1/datasets/dcir/records/29", json={"amount": 777}
                ) as resp:
                    await resp.read()
        deadline = time.monotonic() + 20
        while len(children(parent.pid)) < 2 or children(parent.pid) == first:
            assert time.monotonic() < deadline, children(parent.pid)
            await asyncio.sleep(0.1)
        second = children(parent.pid)
        assert len(second & first) == 1

        # Under load, a worker killed from outside.
        stop, seen = asyncio.Event(), Seen()
        load = spawn(mixed_load(url, stop, seen, writers=16, readers=4, creates=False), name="load")
        try:
            await asyncio.sleep(1.0)
            victim = min(second)
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while len(children(parent.pid)) < 2 or victim in children(parent.pid):
                assert time.monotonic() < deadline, children(parent.pid)
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await load
        assert parent.returncode is None  # the supervisor never went down
        assert len(children(parent.pid) - second) == 1
        assert not [s for s in seen.statuses if s >= 500], sorted(set(seen.statuses))
        counts = await settled(world, within=60)
        assert not counts.get("dead"), counts
        await nothing_acknowledged_is_missing(world, seen)
        for db in (world.source_db, world.target_db):
            rows = await fetch(db, "SELECT amount FROM dcir WHERE id = 29")
            assert rows[0]["amount"] == Decimal(777)  # the orphan, read back and replayed
        log = world.procs[0].log_tail(10**6)
        assert "worker 0 (pid" in log or "worker 1 (pid" in log
        assert "died (signal 9): starting another" in log
