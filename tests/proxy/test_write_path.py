"""The write path of [11/13], red-teamed: its first statement takes the fence, the record lock,
the plan and the intent at once (``bascule_write_begin``), and the replayer leaves a side it
found unreachable alone until a probe reaches it. Each test reproduces a way the new path could
leave the journal wrong, and could fail (see docs/decisions.md, "Dual write at the speed of the
backends"). The crashes between its two statements are tests/proxy/test_dualwrite_fleet.py's
(``kill-after-intent``, ``kill-after-send``)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from decimal import Decimal

import aiohttp
import asyncpg
import pytest

from bascule.sealing import lock_id
from bascule.stages import Side, Stage
from bascule.tasks import spawn
from proxy.replayer import Replayer
from refapi.lab import AUTH, PROXY_ENV
from tests.conftest import Ground
from tests.world import Hooks, World, amount, build_world, table_digest

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def env(ground: Ground) -> Callable[..., AbstractAsyncContextManager[World]]:
    """``env(**options)``: :func:`build_world` over this test's stores."""
    return functools.partial(build_world, ground)


async def _entries(db: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db)
    try:
        return await conn.fetch(
            "SELECT seq, state, attempts, record FROM bascule_journal ORDER BY seq"
        )
    finally:
        await conn.close()


async def _patch(url: str, value: int) -> int:
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.patch(url, json={"amount": value}) as r:
            await r.read()
            return r.status


async def _writer_waiting(conn: asyncpg.Connection) -> int:
    """The pid of the replica's writer session waiting for an advisory lock (once it waits)."""
    async with asyncio.timeout(10):
        while True:
            pid = await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'bascule writer%'"
                " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
            )
            if pid is not None:
                return int(pid)
            await asyncio.sleep(0.05)


async def test_a_write_cut_off_while_waiting_for_its_lock_journals_nothing(env) -> None:  # type: ignore[no-untyped-def]
    # The write's one statement waits for its record's lock; its session to the state
    # Postgres is cut meanwhile, so the replica refuses the write (503). Its backend must
    # not take the lock later and commit an intent for a write that was refused: it must
    # notice that its client is gone and end while it waits.
    async with env(hooks=Hooks(faults={"postgres"})) as world:
        await world.to_stage(Stage.DUALWRITE)
        dual = world.replica.dual
        assert dual is not None
        token = dual.namer.record("dcir", "5")
        holder = await asyncpg.connect(world.state_db)
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", lock_id("dcir", token))
            write = spawn(_patch(f"{world.proxy}/v1/datasets/dcir/records/5", 777), name="w")
            pid = await _writer_waiting(holder)
            world.faults["postgres"].cut()
            assert await write == 503  # refused: never sent anywhere
            async with asyncio.timeout(10):  # its backend ends, the lock not taken
                while await holder.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
                ):
                    await asyncio.sleep(0.1)
            await holder.execute("SELECT pg_advisory_unlock_all()")
            await asyncio.sleep(0.3)
            assert await _entries(world.state_db) == []
        finally:
            await holder.close()
            world.faults["postgres"].heal()
        assert await amount(world.source_db, 5) != Decimal(777)


async def test_a_write_whose_client_leaves_while_it_waits_for_its_lock_lands_on_both_sides(
    env: Callable[..., AbstractAsyncContextManager[World]],
) -> None:
    # A cancelled researcher: the client hangs up while its write waits for the record's
    # lock, inside the statement that commits its intent. The write is not cancelled with it:
    # once the lock comes it is sent, journaled and replayed, like any accepted write.
    async with env() as world:
        await world.to_stage(Stage.DUALWRITE)
        dual = world.replica.dual
        assert dual is not None
        holder = await asyncpg.connect(world.state_db)
        try:
            await holder.execute(
                "SELECT pg_advisory_lock($1)", lock_id("dcir", dual.namer.record("dcir", "6"))
            )
            port = int(world.proxy.rsplit(":", 1)[1])
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = b'{"amount": 654.5}'
            writer.write(
                b"PATCH /v1/datasets/dcir/records/6 HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: {AUTH['Authorization']}\r\n".encode()
                + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            await _writer_waiting(holder)
            writer.close()  # the researcher is gone
            await asyncio.sleep(0.3)
            await holder.execute("SELECT pg_advisory_unlock_all()")
        finally:
            await holder.close()
        counts = await world.drained()
        assert counts == {"applied": 1}, counts
        assert await amount(world.source_db, 6) == Decimal("654.50")
        assert await table_digest(world.source_db) == await table_digest(world.target_db)


def _replayer(world: World) -> Replayer:
    r = world.replica
    assert r.dual is not None
    routes = {(rt.path, m): rt for rt in r.config.routes for m in rt.methods}
    token = PROXY_ENV["BASCULE_TEST_SERVICE_TOKEN"]
    # A breaker that stays open for the whole test once tripped (its wait: 15-30 s).
    return Replayer(
        r.dual.journal,
        r.view,
        r.upstreams,
        routes,
        {Side.SOURCE: token, Side.TARGET: token},
        "breaker",
        base_delay=30.0,
        max_delay=60.0,
        probe_every=60.0,
    )


async def test_a_dead_target_is_left_alone_until_a_probe_reaches_it(env) -> None:  # type: ignore[no-untyped-def]
    # With the target down, every round tried every pending entry again: a refused call and
    # a statement per entry, at the researchers' expense. Once one call finds it unreachable,
    # its entries wait untouched; a probe (one entry) opens the way again.
    async with env() as world:
        assert world.replica.replayer_task is not None and world.apis is not None
        world.replica.replayer_task.cancel()
        await world.to_stage(Stage.DUALWRITE)
        replayer = _replayer(world)
        assert await replayer._lease("replay:dcir")
        base = f"{world.proxy}/v1/datasets/dcir/records"
        target = world.apis[1]
        await target.stop()
        assert await _patch(f"{base}/1", 11) == 200
        await replayer.round("dcir")  # refused: the breaker opens
        assert [(e["state"], e["attempts"]) for e in await _entries(world.state_db)] == [
            ("pending", 1)
        ]
        for rid in (2, 3, 4):  # accepted at the source's pace, journaled
            assert await _patch(f"{base}/{rid}", 10 + rid) == 200
        assert await replayer.round("dcir") == 0  # nothing tried, nothing read
        await target.start()
        assert await replayer.round("dcir") == 0  # still known down: no call before the probe
        later = await _entries(world.state_db)
        assert [(e["state"], e["attempts"]) for e in later[1:]] == [("pending", 0)] * 3
        replayer._down.clear()  # its wait is over
        await replayer.round("dcir")  # the probe reaches it; the wave follows
        states = [e["state"] for e in await _entries(world.state_db)]
        assert states == ["pending", "applied", "applied", "applied"], states
        for rid in (2, 3, 4):
            assert await amount(world.target_db, rid) == Decimal(10 + rid)
        await world.sql(world.state_db, "UPDATE bascule_journal SET next_attempt_at = now()")
        await replayer.round("dcir")  # the first one's retry, brought forward
        assert {e["state"] for e in await _entries(world.state_db)} == {"applied"}
        assert await table_digest(world.source_db) == await table_digest(world.target_db)
