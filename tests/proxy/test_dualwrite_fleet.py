"""Dual write with real proxy processes: many writers through two replicas (in `dualwrite` and
in `live`), a replica killed (SIGKILL) between the backend's answer and the journal's outcome,
and the non-authoritative side really stopped for 10 s while 200 writers keep writing."""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import pytest

from bascule.stages import Stage
from bascule.tasks import spawn
from refapi.lab import AUTH
from tests.harness import RestartableRefapi, dcir_record, refuses_connections
from tests.world import LIVE, MakeWorld, World, researcher_write, researchers, table_digest

# The heavy fleet tests share one worker: two at once would exceed the server's connections.
pytestmark = [pytest.mark.timeout(180), pytest.mark.xdist_group("fleet")]


@pytest.mark.parametrize(
    "stages",
    [(Stage.DUALWRITE,), LIVE],
    ids=["dualwrite", "live"],
)
async def test_200_writers_through_two_replicas_leave_identical_databases(
    fleet: MakeWorld, stages: tuple[Stage, ...]
) -> None:
    # In `live` the target is authoritative and the source follows: the same must hold.
    f = await fleet([None, None], stages)
    statuses = await researchers(f.proxies, writers=200, ops=5, records=20)
    assert not [s for s in statuses if s >= 500], sorted(set(statuses))
    counts = await f.drained(within=60)
    assert counts.get("dead", 0) == 0 and counts.get("in_doubt", 0) == 0, counts
    assert await table_digest(f.source_db) == await table_digest(f.target_db)
    # No record value, body or researcher token in any replica's log.
    for proc in f.procs:
        log = proc.log_tail(10**7)
        assert "Bearer" not in log and "patient_id" not in log and '"amount"' not in log


@pytest.mark.parametrize(
    "failpoint",
    # Between the write's two statements (its intent, lock and plan; its outcome): once the
    # authority answered, and before anything is sent (the intent is committed: an orphan
    # whose write never happened, settled by reading the record back).
    ["kill-after-send:PATCH", "kill-after-intent:PATCH"],
    ids=["after-send", "after-intent"],
)
async def test_a_replica_killed_mid_write_loses_nothing(fleet: MakeWorld, failpoint: str) -> None:
    f = await fleet([failpoint, None])
    killer, survivor = f.proxies
    got_2xx: list[int] = []
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.put(
            f"{survivor}/v1/datasets/dcir/records/4", json={"id": 4, **dcir_record(4, 1.0)}
        ) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientError):
            # after-send: the source applies the PATCH, the replica dies before journaling the
            # outcome; after-intent: it dies before sending it anywhere.
            async with session.patch(
                f"{killer}/v1/datasets/dcir/records/4", json={"amount": 555}
            ) as resp:
                await resp.read()
        assert f.procs[0].proc is not None
        async with asyncio.timeout(10):
            await f.procs[0].proc.wait()
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
        counts = await f.drained(within=40)
        if not counts.get("in_doubt") and not counts.get("intent"):
            break
        assert asyncio.get_running_loop().time() < deadline, counts
        await asyncio.sleep(0.5)
    assert counts.get("dead", 0) == 0, counts
    assert await table_digest(f.source_db) == await table_digest(f.target_db)
    import asyncpg

    for db in (f.source_db, f.target_db):
        conn = await asyncpg.connect(db)
        try:
            assert float(await conn.fetchval("SELECT amount FROM dcir WHERE id = 4")) == 601.0
        finally:
            await conn.close()
    assert os.environ.get("BASCULE_FAILPOINT") is None  # never leaks into the test process


# --- One side really stopped for a while under load -------------------------------------------

WRITERS, RECORDS = 200, 20
BEFORE, OUTAGE, AFTER = 2.0, 10.0, 2.0
"""Seconds of load before the outage, of outage, and of load after the side is back."""
CALL_DEADLINE = 1.0 + 2.0
"""connect_timeout + read_timeout of the fleet's backends: no replay is in flight longer."""


@dataclass
class Load:
    """What the researchers saw: each answer's status with when it came, and each request
    that got no HTTP answer at all."""

    answers: list[tuple[float, int]] = field(default_factory=list)
    failures: list[tuple[float, str]] = field(default_factory=list)

    def between(self, start: float, end: float) -> list[int]:
        return [status for t, status in self.answers if start <= t <= end]


async def keep_writing(urls: list[str], writers: int, records: int, stop: asyncio.Event) -> Load:
    """``researchers()``'s writers (creates, PUTs, PATCHes, DELETEs on ``records`` shared
    records, spread over ``urls``), writing without pause until ``stop`` is set."""
    load = Load()

    async def writer(n: int) -> None:
        rng = random.Random(n)
        base = f"{urls[n % len(urls)]}/v1/datasets/dcir/records"
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(headers=AUTH, timeout=timeout) as session:
            i = 0
            while not stop.is_set():
                i += 1
                req = researcher_write(session, base, rng, records, n, i)
                try:
                    async with req as resp:
                        await resp.read()
                        load.answers.append((time.monotonic(), resp.status))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    load.failures.append((time.monotonic(), type(exc).__name__))

    await asyncio.gather(*(writer(n) for n in range(writers)))
    return load


@dataclass(frozen=True)
class Sample:
    at: float
    pending: int
    applied: int
    sessions: int
    """Client sessions on the whole Postgres server (max_connections is shared)."""


async def watch_journal(state_db: str, stop: asyncio.Event, every: float = 0.2) -> list[Sample]:
    """Sample dcir's journal (entries pending replay, entries applied) until ``stop``."""
    samples: list[Sample] = []
    conn = await asyncpg.connect(state_db)
    try:
        while True:
            last = stop.is_set()  # one sample more once stopped: the journal as it was left
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE state = 'pending') AS pending,"
                " count(*) FILTER (WHERE state = 'applied') AS applied,"
                " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
                " AS sessions FROM bascule_journal WHERE dataset = 'dcir'"
            )
            assert row is not None
            samples.append(
                Sample(time.monotonic(), row["pending"], row["applied"], row["sessions"])
            )
            if last:
                break
            try:
                async with asyncio.timeout(every):
                    await stop.wait()
            except TimeoutError:
                pass
    finally:
        await conn.close()
    return samples


async def stopped_under_load(f: World, down: RestartableRefapi) -> None:
    """200 writers through both replicas; ``down`` (the side that is not authoritative) is
    stopped for OUTAGE seconds while they write, then started again on the same port."""
    stop_load, stop_watch = asyncio.Event(), asyncio.Event()
    watcher = spawn(watch_journal(f.state_db, stop_watch), name="journal-watch")
    writers = spawn(keep_writing(f.proxies, WRITERS, RECORDS, stop_load), name="researchers")
    started = time.monotonic()
    try:
        try:
            await asyncio.sleep(BEFORE)
            await down.stop()
            down_at = time.monotonic()
            assert await refuses_connections(down.url)  # really down: connections refused
            await asyncio.sleep(OUTAGE)
            assert await refuses_connections(down.url)
            await down.start()
            up_at = time.monotonic()
            await asyncio.sleep(AFTER)
        finally:
            if not down.running:
                await down.start()
            stop_load.set()
            load = await writers
        load_ended = time.monotonic()
        counts = await f.drained(within=60)
        drained_at = time.monotonic()
    finally:
        stop_watch.set()
        samples = await watcher

    # Researchers noticed nothing: every write was answered, none with a 5xx, also while the
    # other side was away (the authoritative side answers; the other one is caught up later).
    assert not load.failures, load.failures[:10]
    statuses = [status for _, status in load.answers]
    # 404: a PATCH or DELETE of a record another writer had deleted, answered as is.
    assert set(statuses) <= {200, 201, 204, 404}, sorted(set(statuses))
    during = load.between(down_at, up_at)
    assert load.between(up_at, load_ended), "no write after the side came back"

    # While the side was down nothing reached it, and every write accepted meanwhile joined
    # the backlog: once the calls in flight at the stop were over (CALL_DEADLINE), no entry
    # was applied, and the pending entries grew by the writes answered 2xx (give or take the
    # writes in flight at either end of the window: at most one per writer).
    settled = [s for s in samples if down_at + CALL_DEADLINE + 0.5 <= s.at <= up_at]
    assert len(settled) >= 10, len(settled)
    assert len({s.applied for s in settled}) == 1, "replays applied to a side that was down"
    first, last = settled[0], settled[-1]
    accepted = len([st for t, st in load.answers if first.at < t <= last.at and 200 <= st < 300])
    assert accepted >= 200, accepted  # the outage really happened under load
    grew = last.pending - first.pending
    assert abs(grew - accepted) <= WRITERS, (first, last, accepted)
    peak = max(s.pending for s in samples if down_at <= s.at <= up_at)
    assert peak >= 200, peak

    # Once back, the backlog drains to zero: nothing dead, nothing in doubt.
    assert counts.get("dead", 0) == 0 and counts.get("in_doubt", 0) == 0, counts
    assert counts.get("applied", 0) > 0, counts
    caught_up = next((s.at for s in samples if s.at > up_at and s.pending < peak / 10), None)
    assert caught_up is not None
    assert await table_digest(f.source_db) == await table_digest(f.target_db)
    print(
        f"\n{down.name} down {up_at - down_at:.1f}s under {WRITERS} writers:"
        f" {len(statuses)} writes ({len(during)} during the outage), statuses"
        f" {sorted(set(statuses))}; backlog +{grew} for {accepted} accepted in"
        f" {last.at - first.at:.1f}s, peak {peak} pending; caught up (<10% of peak)"
        f" {caught_up - up_at:.1f}s after the restart; drained {drained_at - load_ended:.1f}s"
        f" after the load stopped; journal {counts}; at most {max(s.sessions for s in samples)}"
        f" Postgres sessions; total {drained_at - started:.1f}s"
    )


@pytest.mark.timeout(90)
async def test_the_target_stopped_10s_under_200_writers_through_two_replicas(
    fleet: MakeWorld,
) -> None:
    # dualwrite: the source is authoritative, the target follows through the journal.
    f = await fleet([None, None], (Stage.DUALWRITE,))
    await stopped_under_load(f, f.target)


@pytest.mark.timeout(90)
async def test_in_live_the_source_stopped_10s_under_200_writers_through_two_replicas(
    fleet: MakeWorld,
) -> None:
    # live: roles swapped, the target is authoritative and the source follows.
    f = await fleet([None, None], LIVE)
    await stopped_under_load(f, f.source)
