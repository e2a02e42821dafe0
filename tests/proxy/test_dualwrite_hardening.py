"""Hardening of the dual-write core found by a red-team review: each test was first written
failing, as the reproduction of a way a write could be lost, reordered or left divergent."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from bascule.sealing import SealError
from bascule.stages import Side, Stage
from bascule.tasks import spawn
from proxy.replayer import Replayer
from refapi.lab import AUTH, PROXY_ENV
from tests.conftest import Ground
from tests.harness import Forward, Hook
from tests.world import LIVE, Hooks, World, amount, build_world

pytestmark = pytest.mark.timeout(90)

Delay = Callable[[web.Request], float]


def delaying(delay: Delay) -> Hook:
    """A backend that waits ``delay(request)`` s before applying each request."""

    async def hook(request: web.Request, forward: Forward) -> web.StreamResponse:
        wait = delay(request)
        if wait:
            await asyncio.sleep(wait)
        return await forward()

    return hook


def processing(hold: float) -> Hook:
    """A backend that answers ``102 Processing`` to each write every 0.3 s for ``hold``
    seconds (a long-running request, legal HTTP/1.1), then applies it and answers; a write
    whose client left meanwhile is never applied."""

    async def hook(request: web.Request, forward: Forward) -> web.StreamResponse:
        if request.method in ("PUT", "PATCH", "POST", "DELETE"):
            deadline = time.monotonic() + hold
            while time.monotonic() < deadline:
                transport = request.transport
                if transport is None or transport.is_closing():
                    return web.Response(status=499)  # nobody left to answer
                # An interim answer, ahead of the one the relay sends at the end.
                transport.write(b"HTTP/1.1 102 Processing\r\n\r\n")
                await asyncio.sleep(0.3)
        return await forward()

    return hook


async def journal(db: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(db)
    try:
        rows = await conn.fetch(
            "SELECT seq, record, method, state, status, last_error FROM bascule_journal"
            " ORDER BY seq"
        )
        return [dict(r) for r in rows]
    finally:
        await conn.close()


@pytest.fixture
def env(ground: Ground) -> Callable[..., AbstractAsyncContextManager[World]]:
    """``env(**options)``: :func:`build_world` over this test's stores."""
    return functools.partial(build_world, ground)


# --- 1. A researcher retry under its own Idempotency-Key replays a STALE answer ------------------


async def test_researcher_idempotent_retry_replays_stale_state(env) -> None:  # type: ignore[no-untyped-def]
    # live: the target is authoritative and honours Idempotency-Key (like the World fixture).
    async with env() as world:
        await world.to_stage(*LIVE)
        url = f"{world.proxy}/v1/datasets/dcir/records/3"
        async with aiohttp.ClientSession(headers=AUTH) as s:
            for key, value in (("k1", 1), ("k2", 2), ("k1", 1)):  # the 3rd is a client retry
                async with s.patch(
                    url, json={"amount": value}, headers={"Idempotency-Key": key}
                ) as r:
                    assert r.status == 200
        await world.drained()
        authority, other = await amount(world.target_db, 3), await amount(world.source_db, 3)
        print("journal:", await journal(world.state_db))
        assert authority == Decimal(2)
        assert other == authority, f"target (authority)={authority} source={other}"


# --- 2. The same record under two spellings of its key is not serialized ------------------------


async def test_same_record_two_key_spellings_replayed_out_of_order(env) -> None:  # type: ignore[no-untyped-def]
    # The target is slow for the path spelled /7 only (one slow replay, nothing else).
    def delay(req: web.Request) -> float:
        return 1.0 if req.method == "PUT" and req.raw_path.endswith("/records/7") else 0.0

    async with env(hooks=Hooks(target=delaying(delay))) as world:
        await world.to_stage(Stage.DUALWRITE)
        world.replica.replayer_task.cancel()
        await asyncio.sleep(0.1)
        base = f"{world.proxy}/v1/datasets/dcir/records"
        async with aiohttp.ClientSession(headers=AUTH) as s:
            async with s.patch(f"{base}/7", json={"amount": 1}) as r:
                assert r.status == 200
            async with s.patch(f"{base}/007", json={"amount": 2}) as r:  # refapi: same record 7
                assert r.status == 200
        rows = await journal(world.state_db)
        assert rows[0]["record"] == rows[1]["record"]  # one record: one token, lock and chain
        journal_ = world.replica.dual.journal
        assert [e.seq for e in await journal_.replayable("dcir")] == [rows[0]["seq"]]
        replayer = _replayer(world, "solo")
        await replayer.round("dcir")
        await replayer.round("dcir")
        assert await amount(world.source_db, 7) == Decimal(2)
        assert await amount(world.target_db, 7) == Decimal(2), "target got the writes reordered"


def _replayer(world: World, name: str, lease: float = 5.0) -> Replayer:
    r = world.replica
    routes = {(rt.path, m): rt for rt in r.config.routes for m in rt.methods}
    creds = {
        Side.SOURCE: PROXY_ENV["BASCULE_TEST_SERVICE_TOKEN"],
        Side.TARGET: PROXY_ENV["BASCULE_TEST_SERVICE_TOKEN"],
    }
    assert r.dual is not None
    return Replayer(
        r.dual.journal,
        r.view,
        r.upstreams,
        routes,
        creds,
        name,
        lease_seconds=lease,
    )


# --- 3. Lease expiry during a round: two replayers apply one record's entries concurrently ------


async def test_lease_expiry_mid_round_reorders_and_kills_replayer(env) -> None:  # type: ignore[no-untyped-def]
    first = {"done": False}

    def delay(req: web.Request) -> float:  # the first replay is slow (network stall, GC, ...)
        if req.method == "PUT" and not first["done"]:
            first["done"] = True
            return 2.0
        return 0.0

    # The target does not honour Idempotency-Key (the design only relies on it where declared).
    async with env(target_idem=False, hooks=Hooks(target=delaying(delay))) as world:
        # Stopped before dcir is journaled, so it never takes the replay lease the test's own
        # replayers need (taken between the stage change and the cancel, it held it 5 s).
        world.replica.replayer_task.cancel()
        await world.to_stage(Stage.DUALWRITE)
        await asyncio.sleep(0.1)
        base = f"{world.proxy}/v1/datasets/dcir/records/3"
        async with aiohttp.ClientSession(headers=AUTH) as s:
            for value in (1, 2):
                async with s.patch(base, json={"amount": value}) as r:
                    assert r.status == 200
        a, b = _replayer(world, "replica-a", lease=0.3), _replayer(world, "replica-b", lease=0.3)
        task_a = spawn(a.run(), name="test")
        await asyncio.sleep(0.6)  # A's lease expired while its round is in flight
        task_b = spawn(b.run(), name="test")
        await asyncio.sleep(3.0)
        task_b.cancel()
        a_error = task_a.exception() if task_a.done() else None
        task_a.cancel()
        print("journal:", await journal(world.state_db), "replayer A died with:", repr(a_error))
        assert a_error is None, f"replayer A crashed: {a_error!r}"
        assert await amount(world.source_db, 3) == Decimal(2)
        assert await amount(world.target_db, 3) == Decimal(2), "stale replay landed last"


async def test_no_replay_starts_once_the_lease_may_have_expired(env) -> None:  # type: ignore[no-untyped-def]
    async with env() as world:
        # Stopped before dcir is journaled, so it never takes the replay lease the test's own
        # replayers need (taken between the stage change and the cancel, it held it 5 s).
        world.replica.replayer_task.cancel()
        await world.to_stage(Stage.DUALWRITE)
        await asyncio.sleep(0.1)
        base = f"{world.proxy}/v1/datasets/dcir/records/3"
        async with aiohttp.ClientSession(headers=AUTH) as s:
            for value in (11, 12):
                async with s.patch(base, json={"amount": value}) as r:
                    assert r.status == 200
        replayer = _replayer(world, "late")
        replayer._held["dcir"] = 0.0  # the lease this replica took has run out
        await replayer.round("dcir")
        assert [r["state"] for r in await journal(world.state_db)] == ["pending", "pending"]
        assert await amount(world.target_db, 3) != Decimal(12)
        assert await replayer._lease("replay:dcir")  # taken again: the run goes, in order
        await replayer.round("dcir")
        assert [r["state"] for r in await journal(world.state_db)] == ["applied", "applied"]
        assert await amount(world.target_db, 3) == Decimal(12)


# --- 4. Orphan false positive: writer alive, its state session lost, call still in flight -------


async def test_orphan_resolved_while_its_write_is_still_in_flight(env) -> None:  # type: ignore[no-untyped-def]
    # The source keeps the request 8 s, far past the writer's deadline (2 s): only a grace
    # longer than a backend's own delay keeps the resolver from reading too early.
    async with env(
        hooks=Hooks(source=processing(hold=8.0)), read_timeout=1.0, orphan_grace=10.0
    ) as world:
        await world.to_stage(Stage.DUALWRITE)
        before = await amount(world.source_db, 3)
        url = f"{world.proxy}/v1/datasets/dcir/records/3"

        async def write() -> int:
            async with aiohttp.ClientSession(headers=AUTH) as s:
                async with s.patch(url, json={"amount": 999}) as r:
                    await r.read()
                    return r.status

        task = spawn(write(), name="test")
        await asyncio.sleep(1.0)
        conn = await asyncpg.connect(world.state_db)
        try:  # the replica's state session drops (PG failover, network blip, idle timeout, ...)
            pid = await conn.fetchval("SELECT writer_pid FROM bascule_journal WHERE seq = 1")
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()
        status = await task
        await asyncio.sleep(1.0)
        await world.drained()
        print("status", status, "journal:", await journal(world.state_db), "before", before)
        src, tgt = await amount(world.source_db, 3), await amount(world.target_db, 3)
        # The writer's deadline (2 s) passed: the researcher is told it timed out (in doubt),
        # and whatever the source ended up holding, the orphan was only read back after it.
        assert status == 504
        assert tgt == src, f"source={src} target={tgt}: the other side lost the write"


# --- 5. A replica with a wrong journal key that wins the lease dead-letters the backlog ---------


async def test_replica_with_wrong_journal_key_dead_letters_entries(env) -> None:  # type: ignore[no-untyped-def]
    from bascule.sealing import Sealer
    from bascule.state.journal import Journal

    async with env() as world:
        await world.to_stage(Stage.DUALWRITE)
        world.replica.replayer_task.cancel()
        await asyncio.sleep(0.1)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            async with s.patch(
                f"{world.proxy}/v1/datasets/dcir/records/4", json={"amount": 5}
            ) as r:
                assert r.status == 200
        bad = _replayer(world, "misconfigured")
        good = world.replica.dual.journal
        bad.journal = Journal(
            good.pool, Sealer(b"\x33" * 32), "misconfigured", sessions=good.sessions
        )
        with pytest.raises(SealError):  # the replica stops; the entry is not its fault
            await bad.round("dcir")
        rows = await journal(world.state_db)
        print("journal:", rows)
        assert rows[0]["state"] != "dead", (
            "a key problem on one replica must not dead-letter entries"
        )


# --- Replay pacing: an idle replayer polls less and less, a write of its own wakes it -----------


async def test_idle_replayer_is_woken_by_a_write_it_journals(env) -> None:  # type: ignore[no-untyped-def]
    async with env() as world:
        await world.to_stage(Stage.DUALWRITE)
        world.replica.replayer_task.cancel()
        replayer = _replayer(world, world.replica.name)
        replayer.idle_wait = replayer.idle_max = 60.0  # were it only polling: a minute's wait
        task = spawn(replayer.run(), name="test-replayer")
        try:
            await asyncio.sleep(0.5)  # its first round found nothing: it waits
            async with aiohttp.ClientSession(headers=AUTH) as s:
                url = f"{world.proxy}/v1/datasets/dcir/records/5"
                async with s.patch(url, json={"amount": 41}) as r:
                    assert r.status == 200
            deadline = time.monotonic() + 10.0
            while await amount(world.target_db, 5) != Decimal(41):
                assert time.monotonic() < deadline, "the write was not replayed: no wake"
                await asyncio.sleep(0.05)
        finally:
            task.cancel()


async def rounds(
    replayer: Replayer, seconds: float, meanwhile: Callable[[], Any] | None = None
) -> int:
    """Waves (rounds that reached the journal) the replayer runs in ``seconds``, while
    ``meanwhile()`` (if given) runs."""
    calls = 0
    wave = replayer.journal.wave

    async def counted(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        return await wave(*args, **kw)

    replayer.journal.wave = counted  # type: ignore[method-assign]
    task = spawn(replayer.run(), name="test-replayer")
    try:
        if meanwhile is None:
            await asyncio.sleep(seconds)
        else:
            async with asyncio.timeout(seconds + 10.0):
                await meanwhile()
    finally:
        task.cancel()
        replayer.journal.wave = wave  # type: ignore[method-assign]
    return calls


async def test_idle_replayer_backs_off(env) -> None:  # type: ignore[no-untyped-def]
    async with env() as world:
        await world.to_stage(Stage.DUALWRITE)
        world.replica.replayer_task.cancel()
        steady = _replayer(world, world.replica.name)
        steady.idle_max = steady.idle_wait  # the old pacing: a round every 50 ms
        backing = _replayer(world, world.replica.name)
        polled, backed = await rounds(steady, 3.0), await rounds(backing, 3.0)
        # 50 ms rounds: about 60 in 3 s; backing off to 0.5 s: 0.05+0.1+0.2+0.4+0.5*... ~ 8
        print(f"wave queries in 3 s: {polled} polling every 50 ms, {backed} backing off")
        assert polled >= 30, polled
        assert backed <= 12, backed


async def test_writes_held_back_wake_the_replayer_no_more_than_polling_did(env) -> None:  # type: ignore[no-untyped-def]
    """Found by a red-team review: each write of a record whose head entry is dead (or in
    doubt, or waiting for a retry) goes pending but cannot be replayed. Every one woke the
    holder for a round: 245 waves in 3 s where polling every 50 ms ran 57."""
    async with env() as world:
        await world.to_stage(Stage.DUALWRITE)
        world.replica.replayer_task.cancel()
        url = f"{world.proxy}/v1/datasets/dcir/records/5"
        async with aiohttp.ClientSession(headers=AUTH) as s:
            async with s.patch(url, json={"amount": 1}) as r:
                assert r.status == 200
            conn = await asyncpg.connect(world.state_db)
            try:  # the record's head entry is dead: what follows it waits
                await conn.execute("UPDATE bascule_journal SET state = 'dead'")
            finally:
                await conn.close()
            writes = 0

            async def stream() -> None:
                nonlocal writes
                await asyncio.sleep(1.0)  # the replayer has taken its lease and found nothing
                end = time.monotonic() + 3.0
                while time.monotonic() < end:
                    async with s.patch(url, json={"amount": 2 + writes % 900}) as r:
                        assert r.status == 200
                    writes += 1

            waves = await rounds(_replayer(world, world.replica.name), 3.0, stream)
        print(f"{writes} writes held back in 3 s: {waves} waves")
        assert writes >= 100, writes  # the stream was a stream
        assert waves <= 1 / 0.05 * 4 + 10, waves  # polling every 50 ms for 4 s, and a margin


async def test_a_replayer_woken_as_it_is_cancelled_stops(env) -> None:  # type: ignore[no-untyped-def]
    """Found by a red-team review: waiting with ``asyncio.wait_for`` on Python 3.11, a wake in
    the loop step of the cancellation swallowed it, and a stopping replica hung on its
    replayer."""
    async with env() as world:
        await world.to_stage(Stage.DUALWRITE)
        world.replica.replayer_task.cancel()
        replayer = _replayer(world, world.replica.name)
        task = spawn(replayer.run(), name="test-replayer")
        await asyncio.sleep(1.0)  # it holds the lease, found nothing, and waits
        assert replayer._held, "the replayer took no lease"
        replayer.journal.wake("dcir")  # a write of this replica goes pending...
        task.cancel()  # ... in the step the replica stops
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(3.0):
                await asyncio.shield(task)
