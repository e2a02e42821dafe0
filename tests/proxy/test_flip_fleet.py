"""Acceptance: flips that are safe under load, with real proxy processes (two replicas).

- A replica frozen (SIGSTOP) while dcir moves shadow -> live holds the switch up only until its
  lease runs out; resumed, it never writes under the old authority.
- A replica cut off from the state Postgres (a FaultProxy in front of that one replica's
  state Postgres only, resetting its sessions) keeps serving reads on its last known stages,
  refuses writes it cannot fence, then reports not ready; the other replica and the flips go
  on; reconnected, it converges.
- ``source -> dualwrite`` with 100 writers in flight through both replicas: every write answered
  2xx that could have read the new stage is journaled, and the databases end identical.

Flips go through the controller with a Switcher from the test process, as ``bascule stage``
does: the exclusive write fence, the authority-switch barrier, replica confirmations.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from bascule.config import SwitchSettings
from bascule.sealing import Sealer
from bascule.stages import Side, Stage
from bascule.state import replicas
from bascule.state.fleet import RedisAnnouncer
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageStore
from bascule.tasks import spawn
from cutover import controller
from cutover.switch import Switcher
from refapi.lab import AUTH, JOURNAL_KEY
from tests.conftest import Ground
from tests.harness import dcir_record
from tests.world import SHADOWED, Hooks, World, build_world, replicas_see, table_digest

# The heavy fleet tests share one worker: two at once would exceed the server's connections.
pytestmark = [pytest.mark.timeout(90), pytest.mark.xdist_group("fleet")]


# --- Two proxy processes, and the means to flip them ------------------------------------------


@dataclass
class FlipFleet:
    world: World
    pool: asyncpg.Pool
    """The test's own pool on the state database (the SRE's side)."""
    store: StageStore
    switcher: Switcher
    announcer: RedisAnnouncer

    def pid(self, i: int) -> int:
        proc = self.world.procs[i].proc
        assert proc is not None
        return proc.pid

    def replica_name(self, i: int) -> str:
        """As the proxy names itself in the journal and its lease (bascule/app/replica.py)."""
        return f"{socket.gethostname()}:{self.pid(i)}"

    async def move(self, wanted: Stage) -> controller.MoveResult:
        """As `bascule stage` does: checked, fenced, audited, announced, confirmed."""
        return await controller.move(
            self.store,
            self.announcer,
            "dcir",
            wanted,
            actor="t",
            reason="t",
            switcher=self.switcher,
        )


MakeFleet = Callable[..., Awaitable[FlipFleet]]


@pytest.fixture
async def flip_fleet(ground: Ground) -> AsyncIterator[MakeFleet]:
    async with AsyncExitStack() as stack:

        async def make(
            stages: tuple[Stage, ...],
            *,
            relayed: bool = False,
            poll_interval: float = 0.5,
            stale_after: float = 30.0,
        ) -> FlipFleet:
            # relayed: proxy 1 reaches the state Postgres through a FaultProxy of its own.
            world = await stack.enter_async_context(
                build_world(
                    ground,
                    replicas=2,
                    processes=True,
                    stages=stages,
                    hooks=Hooks(faults={"postgres"}, faulted=(1,)) if relayed else None,
                    rows=30,
                    seed=11,
                    source_idem=False,
                    ids=True,
                    poll_interval=poll_interval,
                    stale_after=stale_after,
                    read_timeout=2.0,
                )
            )
            pool = await open_pool(world.state_db, max_size=6)
            stack.push_async_callback(pool.close)
            redis = aioredis.Redis.from_url(world.redis_url)
            stack.push_async_callback(redis.aclose)
            store = StageStore(pool)
            if Stage.SHADOW in stages:
                await store.close_gap("dcir", Side.TARGET, actor="t", reason="seeded identically")
            switcher = world.switcher(
                pool,
                SwitchSettings(hold=5.0, small_backlog=200, backlog_wait=30.0, confirm_wait=15.0),
            )
            announcer = RedisAnnouncer(redis, world.config.state.redis_prefix)
            return FlipFleet(world, pool, store, switcher, announcer)

        yield make


# --- Small helpers ------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    served_by: str | None
    error: str | None
    body: dict[str, Any]


async def _answer(resp: aiohttp.ClientResponse) -> Answer:
    text = await resp.text()
    try:
        body = json.loads(text)
    except ValueError:
        body = {"text": text}
    return Answer(
        resp.status, resp.headers.get("X-Served-By"), resp.headers.get("X-Bascule-Error"), body
    )


async def patch(session: aiohttp.ClientSession, url: str, rid: int, amount: int) -> Answer:
    async with session.patch(
        f"{url}/v1/datasets/dcir/records/{rid}", json={"amount": amount}
    ) as resp:
        return await _answer(resp)


async def get(session: aiohttp.ClientSession, url: str, rid: int) -> Answer:
    async with session.get(f"{url}/v1/datasets/dcir/records/{rid}") as resp:
        return await _answer(resp)


def amount_of(answer: Answer) -> Decimal:
    return Decimal(str(answer.body["record"]["amount"]))


async def readyz(session: aiohttp.ClientSession, admin: str) -> tuple[int, dict[str, Any]]:
    async with session.get(f"{admin}/readyz", timeout=aiohttp.ClientTimeout(total=5)) as resp:
        detail: dict[str, Any] = await resp.json()
        return resp.status, detail


async def amount_in(db: str, rid: int) -> Decimal:
    conn = await asyncpg.connect(db)
    try:
        value = await conn.fetchval("SELECT amount FROM dcir WHERE id = $1", rid)
        assert value is not None, rid
        return Decimal(value)
    finally:
        await conn.close()


async def last_seq(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT coalesce(max(seq), 0) FROM bascule_journal"))


async def entries_after(pool: asyncpg.Pool, seq: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT seq, writer, authority, stage_version, state, status FROM bascule_journal"
        " WHERE seq > $1 ORDER BY seq",
        seq,
    )
    return rows


# --- 1. A replica frozen during a switch --------------------------------------------------------


async def test_a_replica_frozen_during_a_switch_holds_it_until_its_lease_expires_only(
    flip_fleet: MakeFleet,
) -> None:
    f = await flip_fleet(SHADOWED)
    frozen, name = f.pid(1), f.replica_name(1)
    async with aiohttp.ClientSession(headers=AUTH) as session:
        # Both replicas write in shadow: the source is the authority.
        for i, url in enumerate(f.world.proxies):
            done = await patch(session, url, 3, 100 + i)
            assert (done.status, done.served_by) == (200, "azure"), done
        await f.world.drained(within=30)
        before = await f.store.get("dcir")
        leases = {r.name: r for r in await replicas.listing(f.pool)}
        assert leases[name].alive and leases[name].versions["dcir"] == before.version, leases

        write: asyncio.Task[Answer] | None = None
        os.kill(frozen, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.2)  # a report already on its way lands; no other comes
            remaining = float(
                await f.pool.fetchval(
                    "SELECT extract(epoch FROM expires_at - now()) FROM bascule_replica"
                    " WHERE name = $1",
                    name,
                )
            )
            lease_ends = time.monotonic() + remaining
            assert remaining > 0.3, remaining  # its lease was alive when the switch began

            seen_lagging: set[str] = set()
            stop_watch = asyncio.Event()

            async def watch() -> None:
                while not stop_watch.is_set():
                    seen_lagging.update(await replicas.lagging(f.pool, "dcir", before.version + 1))
                    await asyncio.sleep(0.05)

            watcher = spawn(watch(), name="lagging-watch")
            started = time.monotonic()
            try:
                result = await f.move(Stage.LIVE)
            finally:
                stop_watch.set()
                await watcher
            ended = time.monotonic()
            assert result.after is not None and result.after.stage is Stage.LIVE
            # Not waited for past its lease, but named: it serves reads on its last stages.
            assert result.lagging == (name,), result.lagging
            [behind] = result.unconfirmed
            assert (behind["version"], behind["lease_alive"]) == (before.version, False), behind
            assert "every live replica confirmed it" not in result.done, result.done
            # It waited for the frozen replica, until its lease ran out, and no longer.
            assert name in seen_lagging, seen_lagging
            assert ended >= lease_ends - 0.1, (ended - started, remaining)
            assert ended - started < remaining + 5.0, (ended - started, remaining)
            lease = {r.name: r for r in await replicas.listing(f.pool)}[name]
            assert not lease.alive and lease.versions["dcir"] == before.version, lease

            # The old authority away: a write applied under it could not succeed.
            await f.world.source.stop()
            latest = await last_seq(f.pool)
            # Sent while the replica is still frozen (the kernel queues it): it is the first
            # thing it reads on resuming, its own view of the stages still at shadow.
            write = spawn(patch(session, f.world.proxies[1], 3, 4242), name="write-on-resume")
            await asyncio.sleep(0.3)
            assert not write.done()
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert write is not None
        async with asyncio.timeout(15):
            done = await write
        assert (done.status, done.served_by) == (200, "scaleway"), done
        entries = await entries_after(f.pool, latest)
        assert [
            (e["writer"], e["authority"], e["stage_version"], e["status"]) for e in entries
        ] == [(name, "target", result.after.version, 200)], [dict(e) for e in entries]
        # The target has it first; the source, never written to directly, does not.
        assert await amount_in(f.world.target_db, 3) == 4242
        assert await amount_in(f.world.source_db, 3) == 101
        # The researcher's next read there follows the write (the new authority serves it).
        read = await get(session, f.world.proxies[1], 3)
        assert (read.status, read.served_by, amount_of(read)) == (200, "scaleway", Decimal(4242)), (
            read
        )
        await f.world.source.start()
        counts = await f.world.drained(within=30)
    assert counts.get("dead", 0) == 0 and counts.get("in_doubt", 0) == 0, counts
    assert await amount_in(f.world.source_db, 3) == 4242
    assert await table_digest(f.world.source_db) == await table_digest(f.world.target_db)
    print(
        f"\nfrozen replica's lease had {remaining:.2f}s left; the switch took"
        f" {ended - started:.2f}s; steps: {list(result.done)}"
    )


# --- 2. A replica cut off from the state Postgres -----------------------------------------------

POLL, STALE = 0.25, 2.0


async def test_a_replica_cut_off_from_the_state_postgres_serves_reads_refuses_writes(
    flip_fleet: MakeFleet,
) -> None:
    f = await flip_fleet(SHADOWED, relayed=True, poll_interval=POLL, stale_after=STALE)
    line = f.world.faults["postgres"]
    assert line.accepted > 0  # proxy 1 reaches Postgres through it
    cut, other = f.world.proxies[1], f.world.proxies[0]
    cut_admin, other_admin = f.world.admin_urls[1], f.world.admin_urls[0]
    cut_name = f.replica_name(1)
    async with aiohttp.ClientSession(headers=AUTH) as session:
        done = await patch(session, cut, 5, 501)
        assert (done.status, done.served_by) == (200, "azure"), done
        await f.world.drained(within=30)

        line.reset()  # every session ends (RST), and every new one
        cut_at = time.monotonic()
        # Reads are served, on its last known stages (shadow: the source serves them).
        read = await get(session, cut, 5)
        assert (read.status, read.served_by, amount_of(read)) == (200, "azure", Decimal(501)), read
        # A write is refused before reaching any backend, and says why.
        asked = time.monotonic()
        refused = await patch(session, cut, 5, 502)
        took = time.monotonic() - asked
        assert (refused.status, refused.error) == (503, "journal_unavailable"), refused
        message = refused.body["error"]["message"]
        assert "write fence" in message and "journal" in message, message
        assert took < 5.0, took
        assert await amount_in(f.world.source_db, 5) == 501

        # Ready a bounded time on its last known stages, then not ready.
        serving_last_known = False
        while True:
            status, detail = await readyz(session, cut_admin)
            if status == 503:
                break
            serving_last_known |= detail["serving_last_known_stages"]
            assert time.monotonic() - cut_at < STALE + 3.0, detail
            await asyncio.sleep(0.05)
        not_ready_after = time.monotonic() - cut_at
        assert serving_last_known
        assert not_ready_after >= STALE - POLL - 0.2, not_ready_after
        assert detail["ready"] is False and detail["stale"] is True, detail
        assert detail["postgres"]["ok"] is False and detail["stages"]["dcir"] == "shadow", detail
        read = await get(session, cut, 5)
        assert (read.status, read.served_by) == (200, "azure"), read  # reads go on regardless

        # dcir moves on without it: its lease has run out, nothing waits for it.
        result = await f.move(Stage.LIVE)
        assert result.after is not None
        # Nothing waits for it, but the flip names it: it still serves reads from the old
        # authority, on the stages it last read (stale by now: it reports not ready).
        assert result.lagging == (cut_name,), result.lagging
        [behind] = result.unconfirmed
        assert behind["lease_alive"] is False and behind["stale_in_seconds"] < 0, behind
        assert "every live replica confirmed it" not in result.done, result.done
        await replicas_see([other_admin], "dcir", Stage.LIVE)
        # The other replica keeps working: ready, reads and writes under the new authority.
        assert (await readyz(session, other_admin))[0] == 200
        done = await patch(session, other, 6, 601)
        assert (done.status, done.served_by) == (200, "scaleway"), done
        read = await get(session, other, 6)
        assert (read.status, read.served_by, amount_of(read)) == (200, "scaleway", Decimal(601)), (
            read
        )
        # The cut replica still believes shadow, and still cannot write under either authority.
        refused = await patch(session, cut, 5, 505)
        assert (refused.status, refused.error) == (503, "journal_unavailable"), refused
        status, detail = await readyz(session, cut_admin)
        assert status == 503 and detail["stages"]["dcir"] == "shadow", detail
        assert await amount_in(f.world.source_db, 5) == 501
        assert await amount_in(f.world.target_db, 5) == 501

        # Reconnected, it converges to the latest stage, ready again.
        line.heal()
        restored_at = time.monotonic()
        while True:
            status, detail = await readyz(session, cut_admin)
            if (
                status == 200
                and detail["stages"]["dcir"] == "live"
                and detail["versions"]["dcir"] == result.after.version
            ):
                break
            assert time.monotonic() - restored_at < 10.0, (status, detail)
            await asyncio.sleep(0.05)
        converged = time.monotonic() - restored_at
        # Its writes work again, under the new authority.
        latest = await last_seq(f.pool)
        done = await patch(session, cut, 5, 504)
        assert (done.status, done.served_by) == (200, "scaleway"), done
        entries = await entries_after(f.pool, latest)
        assert [(e["writer"], e["authority"], e["stage_version"]) for e in entries] == [
            (cut_name, "target", result.after.version)
        ], [dict(e) for e in entries]
        read = await get(session, cut, 5)
        assert (read.status, read.served_by, amount_of(read)) == (200, "scaleway", Decimal(504)), (
            read
        )
        lease = {r.name: r for r in await replicas.listing(f.pool)}[cut_name]
        assert lease.alive and lease.versions["dcir"] == result.after.version, lease
        counts = await f.world.drained(within=30)
    assert counts.get("dead", 0) == 0 and counts.get("in_doubt", 0) == 0, counts
    assert await amount_in(f.world.source_db, 5) == 504
    assert await amount_in(f.world.source_db, 6) == 601
    assert await table_digest(f.world.source_db) == await table_digest(f.world.target_db)
    print(
        f"\ncut: write refused in {took:.2f}s; not ready {not_ready_after:.2f}s after the cut;"
        f" converged {converged:.2f}s after the line was back"
    )


# --- 3. source -> dualwrite with writes in flight -----------------------------------------------

WRITERS, RECORDS = 100, 20


@dataclass(frozen=True)
class Write:
    amount: int
    """Unique to this write: how it is found in the journal."""
    record: int
    sent_at: float
    """Wall clock (as Postgres's now()) just before the request left."""
    answered_at: float
    status: int


async def writer(url: str, n: int, stop: asyncio.Event, writes: list[Write]) -> list[str]:
    """PATCHes and PUTs on the shared records, each with an amount no other write uses."""
    rng = random.Random(n)
    failures: list[str] = []
    base = f"{url}/v1/datasets/dcir/records"
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(headers=AUTH, timeout=timeout) as session:
        i = 0
        while not stop.is_set():
            i += 1
            rid, amount = rng.randint(1, RECORDS), n * 100_000 + i
            if rng.random() < 0.3:
                request = session.put(f"{base}/{rid}", json={"id": rid, **dcir_record(rid, amount)})
            else:
                request = session.patch(f"{base}/{rid}", json={"amount": amount})
            sent = time.time()
            try:
                async with request as resp:
                    await resp.read()
                    writes.append(Write(amount, rid, sent, time.time(), resp.status))
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(type(exc).__name__)
    return failures


def journaled_amounts(rows: list[asyncpg.Record]) -> dict[int, asyncpg.Record]:
    """Each journal entry by the amount its (sealed) request carried."""
    sealer = Sealer(bytes.fromhex(JOURNAL_KEY))
    found: dict[int, asyncpg.Record] = {}
    for row in rows:
        request = json.loads(sealer.open(row["request"], dataset="dcir", field="request"))
        body = json.loads(base64.b64decode(request["body"]))
        amount = int(body["amount"])
        assert amount not in found, amount
        found[amount] = row
    return found


async def test_source_to_dualwrite_with_100_writers_in_flight_journals_every_write_after_it(
    flip_fleet: MakeFleet,
) -> None:
    f = await flip_fleet(())
    writes: list[Write] = []
    stop = asyncio.Event()
    tasks = [
        spawn(writer(f.world.proxies[n % 2], n, stop, writes), name=f"writer {n}")
        for n in range(WRITERS)
    ]
    try:
        await asyncio.sleep(1.5)
        result = await f.move(Stage.DUALWRITE)
        returned_at = time.time()
        await asyncio.sleep(2.0)
    finally:
        stop.set()
        failures = [x for t in await asyncio.gather(*tasks) for x in t]
    assert failures == [], failures[:10]
    after = result.after
    assert after is not None and after.stage is Stage.DUALWRITE
    assert result.lagging == (), result.lagging
    assert "every live replica confirmed it" in result.done, result.done
    committed_at = after.updated_at.timestamp()  # the change's transaction, under the fence

    statuses = [w.status for w in writes]
    assert [s for s in statuses if s >= 500 and s != 503] == [], sorted(set(statuses))
    assert {s for s in statuses if s != 503} <= {200}, sorted(set(statuses))
    counts = await f.world.drained(within=60)
    rows = await f.pool.fetch(
        "SELECT seq, record, authority, stage_version, state, status, request"
        " FROM bascule_journal WHERE dataset = 'dcir' ORDER BY seq"
    )
    journal = journaled_amounts(rows)
    accepted = {w.amount: w for w in writes if 200 <= w.status < 300}
    # Only writes under dualwrite are journaled, under the source's authority, and replayed.
    assert {(r["authority"], r["stage_version"], r["state"]) for r in rows} == {
        ("source", after.version, "applied")
    }, counts
    assert set(journal) <= set(accepted), sorted(set(journal) - set(accepted))[:10]
    # A write missing from the journal read `source` under the fence: it was sent before the
    # change committed (the change waited for it). Every write sent after it is journaled.
    unjournaled = [w for a, w in accepted.items() if a not in journal]
    late = [w for w in unjournaled if w.sent_at >= committed_at]
    assert late == [], late[:10]
    answered_late = [w for w in unjournaled if w.answered_at >= returned_at]
    assert len(journal) >= 100 and len(unjournaled) >= 100, (len(journal), len(unjournaled))
    # Every record was written under dualwrite (the full record replayed to the target), so
    # the two sides must now be identical: only if no write accepted then was left out.
    assert {w.record for w in accepted.values() if w.amount in journal} == set(
        range(1, RECORDS + 1)
    )
    assert await table_digest(f.world.source_db) == await table_digest(f.world.target_db)
    refused = statuses.count(503)
    print(
        f"\n{len(writes)} writes ({refused} refused 503); {len(unjournaled)} accepted under"
        f" source, {len(journal)} journaled under dualwrite; unjournaled answered after the move"
        f" returned: {len(answered_late)}; steps: {list(result.done)}"
    )
