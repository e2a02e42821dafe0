"""A replica cut off from the state Postgres with a write in flight loses its sessions, and the
record locks and write fence they hold, within ``[state] dead_session_after`` (issue 16,
item 1).

The cut is a partition as the server sees it (:meth:`tests.faults.FaultProxy.vanish`): the
replica's side is silent, and its sessions' sockets are gone without a word, so Postgres finds
out only through its own TCP keepalive probes. Before, those came after the server's default
two hours: every create on the other replica got ``record_busy`` and every flip was refused,
for as long. Now both ends probe after half the bound; a flip is refused naming the holder
meanwhile, then (the write left an orphan) until the resolver has settled it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from bascule.config import SwitchSettings
from bascule.errors import Refused
from bascule.stages import Stage
from bascule.state.fleet import RedisAnnouncer
from bascule.state.postgres import connect_probing, open_pool
from bascule.state.stage_store import StageStore
from bascule.tasks import spawn
from cutover import controller
from refapi.lab import AUTH
from tests.conftest import Ground
from tests.harness import Hook, dcir_record
from tests.world import Hooks, build_world, table_digest

pytestmark = [pytest.mark.timeout(150), pytest.mark.xdist_group("fleet")]

DEAD_AFTER = 8.0
"""``[state] dead_session_after`` of this world: short, so that the test is."""
WITHIN = 60.0
"""Seconds the locks may take to come free at most, loosely (the server's default is 7200)."""


def slow_patch_of(rid: int, delay: float) -> Hook:
    """The source answers a PATCH of record ``rid`` ``delay`` seconds late (applied at once)."""

    async def hook(request: web.Request, forward: Callable[[], Awaitable[Any]]) -> Any:
        answer = await forward()
        if request.method == "PATCH" and request.path.endswith(f"/records/{rid}"):
            await asyncio.sleep(delay)
        return answer

    return hook


async def intent_of(state_db: str, replica: str) -> int | None:
    conn = await asyncpg.connect(state_db)
    try:
        seq: int | None = await conn.fetchval(
            "SELECT seq FROM bascule_journal WHERE writer = $1 AND state = 'intent'", replica
        )
        return seq
    finally:
        await conn.close()


async def test_a_replica_cut_off_mid_write_loses_its_locks_within_the_bound(
    ground: Ground,
) -> None:
    async with build_world(
        ground,
        replicas=2,
        stages=(Stage.DUALWRITE,),
        hooks=Hooks(source=slow_patch_of(7, 1.5), faults={"postgres"}, faulted=(1,)),
        dead_session_after=DEAD_AFTER,
    ) as world:
        line = world.faults["postgres"]
        cut, other = world.proxies[1], world.proxies[0]
        cut_name = world.replicas[1].name
        pool = await open_pool(world.state_db, max_size=4)
        redis = aioredis.Redis.from_url(world.redis_url)
        store = StageStore(pool)
        switcher = world.switcher(
            pool, SwitchSettings(hold=1.0, small_backlog=100, backlog_wait=5.0, confirm_wait=2.0)
        )
        announcer = RedisAnnouncer(redis, world.config.state.redis_prefix)
        try:
            async with aiohttp.ClientSession(headers=AUTH) as session:

                async def patch_on_cut() -> int:
                    async with session.patch(
                        f"{cut}/v1/datasets/dcir/records/7", json={"amount": 707}
                    ) as resp:
                        await resp.read()
                        return resp.status

                # A write in flight on the replica about to be cut: its intent is journaled,
                # its session holds dcir's fence, the dataset's lock (shared) and record 7's.
                write = spawn(patch_on_cut(), name="write-in-flight")
                while await intent_of(world.state_db, cut_name) is None:
                    await asyncio.sleep(0.02)
                # The server's last answers acknowledged (a delayed ACK is 40 ms): from here
                # only its keepalive probes can find out that the peer is gone.
                await asyncio.sleep(0.3)
                line.vanish()
                cut_at = time.monotonic()

                # Meanwhile a flip that alters writes is refused, naming who holds the fence.
                with pytest.raises(Refused) as refused:
                    await controller.move(
                        store, announcer, "dcir", Stage.SOURCE, actor="t", reason="t",
                        switcher=switcher,
                    )  # fmt: skip
                assert "writes in flight did not finish" in str(refused.value), refused.value
                assert f"bascule writer {cut_name}" in str(refused.value), refused.value
                assert f"within {DEAD_AFTER:g} s" in str(refused.value), refused.value

                # The other replica's create needs the dataset's lock exclusively.
                attempts: list[int] = []
                while True:
                    async with session.post(
                        f"{other}/v1/datasets/dcir/records", json=dcir_record(900, 1)
                    ) as resp:
                        await resp.read()
                        attempts.append(resp.status)
                        if resp.status == 201:
                            break
                        assert resp.status == 503, (resp.status, await resp.text())
                        assert resp.headers["X-Bascule-Error"] == "record_busy"
                    assert time.monotonic() - cut_at < WITHIN, attempts
                released = time.monotonic() - cut_at

                # The cut replica's researcher got the source's answer: the write happened.
                assert await write == 200

                # Once the session is gone, a flip waits for the orphan it left to be settled
                # (its deadline and orphan_grace), and then goes through.
                refusals: list[str] = []
                while True:
                    try:
                        await controller.move(
                            store, announcer, "dcir", Stage.SOURCE, actor="t", reason="t",
                            switcher=switcher,
                        )  # fmt: skip
                        break
                    except Refused as exc:
                        refusals.append(str(exc))
                    assert time.monotonic() - cut_at < 2 * WITHIN, refusals[-3:]
                    await asyncio.sleep(0.5)
                flipped = time.monotonic() - cut_at
                assert all(
                    "left by a replica that died" in r or "writes in flight" in r for r in refusals
                ), refusals
        finally:
            await redis.aclose()
            await pool.close()
        # Both sides hold the write (the orphan was read back from the source and replayed),
        # and the create.
        line.reset()
        line.heal()
        await world.to_stage(Stage.DUALWRITE)
        await world.drained(within=60)
        assert await table_digest(world.source_db) == await table_digest(world.target_db)
    print(
        f"\ncut off mid-write (dead_session_after {DEAD_AFTER:g} s): the other replica's create"
        f" went through {released:.2f} s after the cut ({len(attempts) - 1} record_busy"
        f" before), a flip {flipped:.2f} s after it"
    )


async def test_a_server_refusing_the_probes_still_lets_replicas_connect(pg_url: str) -> None:
    """Red team: a state Postgres that refuses a probe setting (one before 12 has no
    ``tcp_user_timeout``; some platforms support none) must not keep every replica out: the
    session is opened again without them, and that is logged."""
    conn = await connect_probing(pg_url, server_settings={"tcp_user_timeout": "-1"})
    try:
        assert await conn.fetchval("SHOW tcp_user_timeout") == "0"
    finally:
        await conn.close()
    with pytest.raises(asyncpg.PostgresError):  # any other refusal is not hidden
        await connect_probing(pg_url, server_settings={"work_mem": "-1"})


async def test_a_session_idle_inside_a_transaction_is_ended(pg_url: str) -> None:
    """A replica's or the CLI's session frozen mid-transaction (they only ever run statements
    in theirs) does not hold its row locks for good: the server ends it."""
    pool = await open_pool(pg_url, max_size=1, idle_in_transaction=0.5)
    try:
        async with pool.acquire() as conn:
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
                async with conn.transaction():
                    await conn.execute("SELECT 1")
                    await asyncio.sleep(1.5)
                    await conn.execute("SELECT 1")
    finally:
        await pool.close()
