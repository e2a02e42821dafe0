"""Shadow reads, hardened: one test per finding of a red-team review of shadow/dispatch.py,
proxy/forward.py and the race guard (``RaceGuard.race``). Each failed on the code reviewed; the fix
is named in docs/decisions.md (Shadow reads).

False mismatches (a comparison called divergent when the data are not):
- F1 a replay applied between the shadow read and the guard's statement;
- F2 an in-doubt write resolved (re-sent) after the read: ``decided_at`` is the 5xx time;
- F3 a replica whose view is behind an authority switch: the serving side is not the
  entries' authority;
- F7 a content-coded shadowed answer (no Accept-Encoding lets a server pick any coding).
Missed divergences / wrong figures:
- F4 a shadowed answer larger than the limit while the serving one fit: skipped, never mismatched;
- F5 error answers on both sides counted ``matched`` (and ``compared``); a shadowed 503
  counted ``mismatched``;
- F6 a mismatch whose Postgres row could not be written leaves no durable evidence;
- F13 a steady stream of creates (journaled under `*`) makes every record read `raced`;
- F14 a read route's own compare rules are lost when a write route shares its path.
Cost to researchers and to the state Postgres:
- F8 the guard's prepared statement goes generic after a few dataset-wide calls: record reads
  then scan every open entry of the dataset;
- F9 a read held back by an entry that will not settle polls Postgres 50 times a second;
- F10 the queue's byte bound ignores the jobs in flight;
- F11 the database clock estimate follows steps of the host's wall clock;
- F12 researchers lose content-coding on every shadowed read.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import statistics
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from multidict import CIMultiDict

from bascule.errors import StoreError
from bascule.sealing import DATASET_WIDE, Namer, Sealer
from bascule.stages import Side, Stage
from bascule.state.journal import Journal
from bascule.state.journal.guard import RaceGuard
from bascule.state.postgres import open_pool
from refapi.lab import AUTH, HMAC_KEY, migrate_state
from shadow import dispatch, ledger
from shadow.compare import Answer
from shadow.dispatch import DbClock, Dispatcher, Job
from tests.conftest import Ground
from tests.harness import Forward, Hook, dcir_record, offline_config
from tests.world import Hooks, shadow_world

pytestmark = pytest.mark.timeout(240)

RECORD_ROUTE = "/v1/datasets/{dataset}/records/{id}"


def is_replay(request: web.Request) -> bool:
    return request.headers.get("Idempotency-Key", "").startswith("bascule:")


def is_shadow(request: web.Request) -> bool:
    return request.headers.get("X-Bascule-Shadow") == "1"


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as resp:
        return resp.status, await resp.read()


# ============================================================================================
# F1 (critical) — a replay applied between the shadow read and the guard's check
# ============================================================================================


async def test_f1_replay_applied_after_the_shadow_read_is_not_a_mismatch(ground: Ground) -> None:
    """Timeline (stage `shadow`, source authoritative and serving, target shadowed):

    T      PATCH record 3 -> source commits, entry decided (pending)
    t0>T   GET record 3 -> source answers the new amount; job queued
    t0+e   shadow GET reaches the target, which reads the OLD amount (replay not there yet)...
    T+0.3  ...the replay reaches the target; the replayer marks the entry applied
    t0+1   ...the target's answer (old amount) arrives; the guard runs: the entry is decided
           before t0 and applied -> (raced=False, lagging=False) -> compared -> MISMATCH.

    The guard checks "applied" when it runs, not "applied before the shadow read was sent".
    The delays only make a window that busy systems hit at random deterministic."""

    async def target(request: web.Request, forward: Forward) -> web.Response:
        if is_replay(request):
            await asyncio.sleep(0.3)  # the replay reaches the target a little later
            return await forward()
        if is_shadow(request):
            answer = await forward()  # the target reads now...
            await asyncio.sleep(1.0)  # ...and answers late (a busy shadowed side)
            return answer
        return await forward()

    async with shadow_world(ground, hooks=Hooks(target=target)) as world:
        base = f"{world.proxy}/v1/datasets/dcir/records"
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.patch(f"{base}/3", json={"amount": 999}) as resp:
                assert resp.status == 200, await resp.text()
            await asyncio.sleep(0.1)  # past DbClock's margin: the write is before t0
            status, _ = await get(session, f"{base}/3")
            assert status == 200
        counts = await world.settled()
        found = await world.mismatches()
    # The data converged (the replay landed): nothing diverges.
    assert counts["mismatched"] == 0 and found == [], (counts, found)


# ============================================================================================
# F2 (critical) — an in-doubt write resolved after the read: decided_at is not its commit time
# ============================================================================================


async def test_f2_in_doubt_write_resent_after_the_read_is_not_a_mismatch(ground: Ground) -> None:
    """Timeline (stage `shadow`; the create route declares idempotent_backend):

    T      POST create (Idempotency-Key k) -> the source answers 503 without applying it:
           the entry is in_doubt, decided_at = T
    t0>T   GET records?limit=100 -> the source answers 50 rows (the create is NOT there)
           guard: an entry decided at T <= t0, not applied -> lagging: wait
    R      the resolver re-sends under k: the source applies it NOW (R > t0); pending
    R+e    replayed to the target, applied; guard: decided_at T <= t0 and applied ->
           clean -> asks the target again: 51 rows vs the serving answer's 50 -> MISMATCH.

    decided_at stays the time of the 503 (``_move`` only sets it when leaving `intent`), but
    the write reached the serving side at R. The same holds for a keyed in-doubt write the
    backend committed after its client timed out, settled by reading the record back."""
    state = {"first": True}

    async def source(request: web.Request, forward: Forward) -> web.Response:
        if request.method == "POST" and request.path.endswith("/records"):
            if state["first"]:
                state["first"] = False
                return web.json_response({"error": "unavailable"}, status=503)  # not applied
            await asyncio.sleep(0.6)  # the resolver's re-send, applied a little later
        return await forward()

    async with shadow_world(
        ground,
        hooks=Hooks(source=source),
        idempotent_creates=True,
        extra="[shadow]\nlag_wait = 5.0\n",
    ) as world:
        base = f"{world.proxy}/v1/datasets/dcir/records"
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.post(
                base, json=dcir_record(1), headers={"Idempotency-Key": "redteam-create-1"}
            ) as resp:
                assert resp.status == 503
            await asyncio.sleep(0.1)  # past DbClock's margin: the 503 is before t0
            status, _ = await get(session, f"{base}?limit=100")
            assert status == 200
        counts = await world.settled()
        deadline = time.monotonic() + 30
        while True:  # the resolver re-sends the create, and it is replayed
            entries = await world.sql(
                world.state_db, "SELECT state FROM bascule_journal WHERE dataset = 'dcir'"
            )
            if [e["state"] for e in entries] == ["applied"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        found = await world.mismatches()
    # The scenario happened: the in-doubt create was re-sent and replayed.
    assert [e["state"] for e in entries] == ["applied"], entries
    assert counts["mismatched"] == 0 and found == [], (counts, found)


# ============================================================================================
# F3 (high) — a replica whose view is behind an authority switch
# ============================================================================================


async def test_f3_stale_view_after_the_authority_switch_is_not_a_mismatch(ground: Ground) -> None:
    """The switch commits `live` and releases the fence (step 4) before every replica runs it
    (step 5). Replica B has not seen it yet (a lost Redis message: up to poll_interval).

    T      PATCH record 3 on replica A: fenced stage `live` -> the TARGET applies it, decided
           at T; the replay to the source is pending
    t0>T   GET record 3 on replica B (view: `shadow`): the SOURCE serves the old amount
           guard: decided at T <= t0 -> "in the serving side's answer" (false: its authority
           is the target) -> lagging; once replayed to the source: ask the target again ->
           new amount vs old -> MISMATCH, counted in `live` (towards its rollback budget)."""

    async def source(request: web.Request, forward: Forward) -> web.Response:
        if is_replay(request):
            await asyncio.sleep(1.0)  # the replay to the source takes a moment
        return await forward()

    async with shadow_world(
        ground,
        hooks=Hooks(source=source),
        replicas=2,
        poll_interval=20.0,
    ) as world:
        await world.to_stage(Stage.LIVE, seen_by=(0,))  # B (index 1) still runs `shadow`
        assert world.replicas[1].view.get("dcir").stage == Stage.SHADOW  # type: ignore[union-attr]
        a, b = (f"{p}/v1/datasets/dcir/records" for p in world.proxies)
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.patch(f"{a}/3", json={"amount": 777}) as resp:
                assert resp.status == 200, await resp.text()
            await asyncio.sleep(0.1)  # past DbClock's margin: the write is before t0
            status, _ = await get(session, f"{b}/3")
            assert status == 200
        counts = await world.settled()
        found = await world.mismatches()
    assert counts["mismatched"] == 0 and found == [], (counts, found)


# ============================================================================================
# F4 (high) — a divergent shadowed answer over the size limit is skipped, never a mismatch
# ============================================================================================


async def test_f4_oversized_shadowed_answer_is_not_silently_skipped(ground: Ground) -> None:
    """The target holds 400 rows the source does not (a filter bug, a double backfill...).
    The serving answer fits the limit; the target's does not: the read is counted
    `skipped_large`, which no gate condition looks at. Bodies whose sizes straddle the limit
    cannot be byte-equal: this is evidence of divergence, not a reason to look away."""
    async with shadow_world(
        ground,
        extra="[shadow]\nmax_body_bytes = 40000\n",
    ) as world:
        await world.sql(
            world.target_db,
            "INSERT INTO dcir (id, patient_id, act_code, act_date, amount,"
            " prescriber_speciality, department, created_at, updated_at)"
            " SELECT 1000 + g, patient_id, act_code, act_date, amount,"
            " prescriber_speciality, department, created_at, updated_at"
            " FROM dcir, generate_series(1, 400) g WHERE id = 9",
        )
        async with aiohttp.ClientSession(headers=AUTH) as session:
            _, served = await get(
                session, f"{world.source_url}/v1/datasets/dcir/records?limit=1000"
            )
            _, other = await get(session, f"{world.target_url}/v1/datasets/dcir/records?limit=1000")
            assert len(served) < 40000 < len(other), (len(served), len(other))
            status, _ = await get(session, f"{world.proxy}/v1/datasets/dcir/records?limit=1000")
            assert status == 200
        counts = await world.settled()
        errored = await ledger.errored(world.replica.pool, "dcir")
    # Not silently skipped: an errored comparison, which the gate counts (from Postgres).
    assert counts["skipped_large"] == 0 and counts["errored"] == 1, counts
    assert [(e["reason"], e["count"]) for e in errored] == [("shadow_too_large", 1)], errored


# ============================================================================================
# F5 (high) — error answers are counted as comparisons
# ============================================================================================


async def test_f5_error_answers_are_neither_matches_nor_divergences(ground: Ground) -> None:
    """Both backends answer 503 for record 13 (a shared identity provider is down): counted
    `matched` and `compared`, filling `min_compared` with no data compared. The target alone
    answers 503 for record 14 (it is shedding shadow load): counted `mismatched` — in `live`
    (the source shadowed) a source overload rolls the dataset back."""

    def failing(ids: tuple[str, ...]) -> Hook:
        async def hook(request: web.Request, forward: Forward) -> web.Response:
            if request.method == "GET" and request.path.rsplit("/", 1)[-1] in ids:
                return web.json_response({"error": "unavailable"}, status=503)
            return await forward()

        return hook

    async with shadow_world(
        ground,
        hooks=Hooks(source=failing(("13",)), target=failing(("13", "14"))),
    ) as world:
        base = f"{world.proxy}/v1/datasets/dcir/records"
        async with aiohttp.ClientSession(headers=AUTH) as session:
            assert (await get(session, f"{base}/13"))[0] == 503
            assert (await get(session, f"{base}/14"))[0] == 200
        counts = await world.settled()
    # Neither read compared any data: whatever outcome they get (errored, or a skipped_* the
    # gate lists), it is not `matched`, not `mismatched` and not `compared`.
    assert (counts["compared"], counts["matched"], counts["mismatched"]) == (0, 0, 0), counts


# ============================================================================================
# F6 (medium) — a mismatch whose evidence could not be written is gone
# ============================================================================================


async def test_f6_a_mismatch_leaves_durable_evidence_when_postgres_blips(ground: Ground) -> None:
    """The Postgres insert of a mismatch fails once (a failover, `too many clients`): the
    outcome becomes `errored` in Redis only — no mismatch row, no durable errored figure. A
    Redis restart (or a failed counter flush, whose counts are dropped) and the gate sees a
    clean window, although a divergence was found."""
    async with shadow_world(ground) as world:
        await world.sql(world.target_db, "UPDATE dcir SET amount = amount + 1 WHERE id = 4")
        ledger = world.replica.shadow.ledger  # type: ignore[union-attr]
        real = ledger.mismatch
        calls = {"n": 0}

        async def blip(*args: Any, **kwargs: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise StoreError("the state Postgres refused the operation (TooManyConnections)")
            await real(*args, **kwargs)

        ledger.mismatch = blip  # type: ignore[method-assign]
        async with aiohttp.ClientSession(headers=AUTH) as session:
            assert (await get(session, f"{world.proxy}/v1/datasets/dcir/records/4"))[0] == 200
        counts = await world.settled()
        await asyncio.sleep(2.5)  # any retry the dispatcher might do
        found = await world.mismatches()
    assert counts["mismatched"] == 1 and counts["errored"] == 0, counts
    assert found, "the divergence left no row in Postgres: the gate's evidence is gone"


async def test_a_mismatch_written_after_an_outage_says_when_it_was_found(ground: Ground) -> None:
    """The state Postgres is away for 3 s when a divergence is found: its row, written once
    Postgres is back, carries the time the shadow read found it (what on-call reads as "since
    when"), not the time it could be written."""
    async with shadow_world(ground) as world:
        await world.sql(world.target_db, "UPDATE dcir SET amount = amount + 1 WHERE id = 4")
        ledger = world.replica.shadow.ledger  # type: ignore[union-attr]
        real = ledger.mismatch
        back = time.monotonic() + 3.0
        tried: list[float] = []

        async def outage(*args: Any, **kwargs: Any) -> None:
            tried.append(time.time())
            if time.monotonic() < back:
                raise StoreError("the state Postgres could not be reached")
            await real(*args, **kwargs)

        ledger.mismatch = outage  # type: ignore[method-assign]
        before = time.time()
        async with aiohttp.ClientSession(headers=AUTH) as session:
            assert (await get(session, f"{world.proxy}/v1/datasets/dcir/records/4"))[0] == 200
        after = time.time()
        while time.monotonic() < back + 5.0 and not await world.mismatches():
            await asyncio.sleep(0.2)
        rows = await world.sql(
            world.state_db, "SELECT extract(epoch FROM at)::float8 AS at FROM bascule_mismatch"
        )
    assert len(rows) == 1, rows
    assert tried[-1] - before >= 2.9, "the write was never refused: the outage did not happen"
    assert before - 0.5 <= rows[0]["at"] <= after + 0.5, (before, rows[0]["at"], tried[-1])


# ============================================================================================
# F7 (medium) — a content-coded shadowed answer is compared as bytes
# ============================================================================================


def gzipped(answer: web.Response) -> web.Response:
    plain = answer.body
    assert isinstance(plain, bytes)
    coded = web.Response(status=answer.status, body=gzip.compress(plain, mtime=None))
    coded.headers["Content-Type"] = answer.headers.get("Content-Type", "application/json")
    coded.headers["Content-Encoding"] = "gzip"
    return coded


async def test_f7_content_coded_shadowed_answer_is_not_a_mismatch(ground: Ground) -> None:
    """The proxy drops Accept-Encoding instead of asking for `identity`; RFC 9110 §12.5.3 lets
    a server then use any coding (a CDN or ingress in front of the new cloud often does). The
    comparison never looks at Content-Encoding: gzip bytes vs JSON -> `type` at the root."""

    async def target(request: web.Request, forward: Forward) -> web.Response:
        answer = await forward()
        return gzipped(answer) if request.method == "GET" else answer

    async with shadow_world(ground, hooks=Hooks(target=target)) as world:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            assert (await get(session, f"{world.proxy}/v1/datasets/dcir/records/5"))[0] == 200
        counts = await world.settled()
    assert counts["mismatched"] == 0, counts


# ============================================================================================
# F12 (medium) — researchers lose compression on every shadowed read
# ============================================================================================


async def test_f12_researchers_keep_their_content_coding_on_shadowed_reads(ground: Ground) -> None:
    """A source that gzips when asked. In `dualwrite` the researcher gets gzip; in `shadow`
    (shadow_sample = 1.0 by default: every read) Accept-Encoding is stripped and the
    researcher gets the identity body — several times the bytes on a WAN, for every read."""

    async def source(request: web.Request, forward: Forward) -> web.Response:
        answer = await forward()
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return gzipped(answer)
        return answer

    async with shadow_world(
        ground,
        hooks=Hooks(source=source),
        stages=(Stage.DUALWRITE,),
    ) as world:
        url = f"{world.proxy}/v1/datasets/dcir/records?limit=50"
        headers = {**AUTH, "Accept-Encoding": "gzip"}
        async with aiohttp.ClientSession(headers=headers, auto_decompress=False) as session:
            async with session.get(url) as resp:
                before = resp.headers.get("Content-Encoding")
                await resp.read()
            await world.to_stage(Stage.SHADOW)
            async with session.get(url) as resp:
                after = resp.headers.get("Content-Encoding")
                await resp.read()
        await world.settled()
    assert before == "gzip"
    assert after == "gzip", "a shadowed read cost the researcher their compression"


# ============================================================================================
# F8 (high) — the guard's statement turns into a scan of every open entry
# ============================================================================================


@pytest.fixture
async def journal(pg_url: str) -> AsyncIterator[Journal]:
    await migrate_state(pg_url)
    pool = await open_pool(pg_url)  # as the replica opens it
    yield Journal(pool, Sealer(bytes(range(32))), replica="redteam")
    await pool.close()


async def _timed_race(journal: Journal, records: tuple[str, ...] | None, t0: float) -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        await RaceGuard(journal.pool).race("dcir", records, t0=t0, t1=t0, serving="source")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def test_f8_record_guard_stays_indexed_after_dataset_wide_guards(
    journal: Journal, pg_url: str
) -> None:
    """A replay backlog of 200,000 entries (the target was down for a while). One prepared
    statement serves both record reads (`record = ANY($2)`) and dataset-wide reads
    (`$2 IS NULL`): after five dataset-wide calls Postgres settles on a generic plan, and every
    record read's guard on that connection then scans the whole backlog (~1 ms -> ~100 ms on
    this machine), every 20 ms per lagging read, on the Postgres that journals researchers'
    writes. Which connections go generic depends on what their first guards were."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "INSERT INTO bascule_journal (dataset, record, route, method, authority,"
            " stage_version, writer, writer_pid, writer_started, state, request, decided_at,"
            " created_at) SELECT 'dcir', md5((g % 40000)::text), '/r', 'PUT', 'source', 2, 'w',"
            " 1, now(), 'pending', '\\x00'::bytea, now() - interval '60 s', now() - interval '60 s'"
            " FROM generate_series(1, 200000) g"
        )
        await conn.execute("ANALYZE bascule_journal")
        t0 = float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())"))
    finally:
        await conn.close()
    mine = (Namer(bytes.fromhex(HMAC_KEY)).record("dcir", "1"), DATASET_WIDE)
    fresh = await _timed_race(journal, mine, t0)  # a connection that served record reads first
    other = await open_pool(pg_url)  # another replica's, or another connection of the pool
    try:
        busy = Journal(other, journal.sealer, replica="redteam-2")
        for _ in range(6):  # its first guards were of dataset-wide reads (a list, a query)
            await RaceGuard(busy.pool).race("dcir", None, t0=t0, t1=t0, serving="source")
        after = await _timed_race(busy, mine, t0)
    finally:
        await other.close()
    assert after < max(5 * fresh, 0.015), (fresh, after)


# ============================================================================================
# F9 (medium) — a read held back by an entry that will not settle polls Postgres at 50 Hz
# ============================================================================================


async def test_f9_a_held_back_read_does_not_hammer_the_state_postgres(ground: Ground) -> None:
    """A dataset-wide entry is dead (or in doubt: a keyless orphan is never re-sent, so it
    stays in doubt until an SRE acts). Every read of the dataset is then `lagging`: each
    shadow read holds a worker for lag_wait and runs the guard every 20 ms — 100 statements
    per read, 800/s per replica with 16 workers, for as long as the entry stays."""
    async with shadow_world(ground) as world:
        # The answers differ (equal ones match without asking the journal).
        await world.sql(world.target_db, "UPDATE dcir SET amount = amount + 1 WHERE id <= 4")
        await world.sql(
            world.state_db,
            "INSERT INTO bascule_journal (dataset, record, route, method, authority,"
            " stage_version, writer, writer_pid, writer_started, state, request, decided_at)"
            " VALUES ('dcir', '*', '/v1/datasets/{dataset}/purge', 'POST', 'source', 2, 'w',"
            " 1, now(), 'dead', '\\x00'::bytea, now() - interval '60 s')",
        )
        dispatcher = world.replica.shadow
        assert isinstance(dispatcher, Dispatcher) and dispatcher.guard is not None
        real = dispatcher.guard
        calls = {"n": 0}

        async def counting(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            return await real(*args, **kwargs)

        dispatcher.guard = counting
        async with aiohttp.ClientSession(headers=AUTH) as session:
            for rid in range(1, 5):
                assert (await get(session, f"{world.proxy}/v1/datasets/dcir/records/{rid}"))[
                    0
                ] == 200
        counts = await world.settled()
    assert counts["skipped_lagging"] == 4, counts
    assert calls["n"] <= 4 * 10, f"{calls['n']} guard statements for 4 shadow reads"


# ============================================================================================
# F10 (medium) — the queue's byte bound does not count the jobs in flight
# ============================================================================================


class _Ledger:
    async def count_many(self, counts: Any) -> None:
        return None

    async def mismatch(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Stuck:
    """An upstream whose answers never come (a slow shadowed side, up to the deadline)."""

    def request(self, *args: Any, **kwargs: Any) -> Any:
        @contextlib.asynccontextmanager
        async def exchange() -> AsyncIterator[Any]:
            await asyncio.Event().wait()
            yield None

        return exchange()


async def test_f10_queue_bytes_bound_holds_with_jobs_in_flight(tmp_path: Path) -> None:
    """max_body_bytes = 1 MB, so the queue may hold 4 MB. Jobs leave the byte count when a
    worker takes them, not when they are done: with 4 workers stuck on a slow shadowed side,
    8 jobs of 0.9 MB (7.2 MB) are held, and each worker will hold the shadowed answer (up to
    max_body_bytes) and both parsed documents on top. With the defaults (16 MB, 16 workers)
    that is 64 MB queued + 16 x (16 + 16 MB + parse trees, ~5x) — gigabytes, plus every
    researcher read being captured (up to 16 MB each) before submit() even looks."""
    config = offline_config(
        tmp_path / "bascule.toml",
        extra="[shadow]\nconcurrency = 4\nqueue = 100\nmax_body_bytes = 1000000\ndeadline = 30\n",
    )
    dispatcher = Dispatcher(
        config,
        _Ledger(),  # type: ignore[arg-type]
        {Side.SOURCE: _Stuck(), Side.TARGET: _Stuck()},  # type: ignore[dict-item]
        lambda s: s,
    )
    dispatcher.clock.offset = 0.0  # as if calibrated: the jobs reach the stuck side
    await dispatcher.start()
    try:

        def job() -> Job:
            return Job(
                dataset="dcir",
                route=RECORD_ROUTE,
                method="GET",
                target="/v1/datasets/dcir/records/1",
                headers=[],
                body=b"",
                serving=Side.SOURCE,
                shadowed=Side.TARGET,
                answer=Answer(200, CIMultiDict(), b"x" * 900_000),
                t0=time.time(),
                records=None,
            )

        def dropped(dispatcher: Dispatcher) -> int:
            return sum(
                n
                for (dataset, route, outcome, _version), n in dispatcher.tally.counts.items()
                if (dataset, route, outcome) == ("dcir", RECORD_ROUTE, "dropped")
            )

        held = 0
        for _ in range(4):
            before = dropped(dispatcher)
            dispatcher.submit(job())
            held += 900_000 * (dropped(dispatcher) == before)
        await asyncio.sleep(0.1)  # the workers take them, and wait on the shadowed side
        for _ in range(4):
            before = dropped(dispatcher)
            dispatcher.submit(job())
            held += 900_000 * (dropped(dispatcher) == before)
        assert held <= dispatcher.budget, (held, dispatcher.budget)
    finally:
        for task in dispatcher._tasks:
            task.cancel()
        for task in dispatcher._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


# ============================================================================================
# F11 (medium) — the database clock estimate follows steps of the host's wall clock
# ============================================================================================


async def test_f11_db_clock_estimate_survives_a_host_clock_step(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DbClock keeps an offset between time.time() and the database's clock, re-measured every
    10 s. An NTP step of the host's clock (+0.5 s here) in between moves every t0 0.5 s later
    than the database's time: writes decided in those 0.5 s — possibly after the serving side
    answered — are taken as "in the serving answer", waited for, then compared: false
    mismatches. time.monotonic() never steps."""
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1)
    try:
        clock = DbClock()
        await clock.calibrate(pool)
        real = time.time
        stepped = types.SimpleNamespace(
            time=lambda: real() + 0.5,
            monotonic=time.monotonic,
            perf_counter=time.perf_counter,
        )
        monkeypatch.setattr(dispatch, "time", stepped)
        estimate = clock.now()
        db = float(await pool.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8"))
    finally:
        await pool.close()
    assert estimate is not None
    assert estimate <= db, f"t0 estimate {estimate - db:+.3f} s ahead of the database's clock"


# ============================================================================================
# F13 (high) — a dataset with a steady stream of creates blinds every record read
# ============================================================================================


async def test_f13_creates_elsewhere_in_the_dataset_do_not_blind_record_reads(
    ground: Ground,
) -> None:
    """Record 6 differs in the target and is never written. Researchers create new records
    (POST .../records: server-assigned ids, journaled under the dataset-wide token `*`) at a
    steady rate — an ingestion feed. Every read of record 6 is guarded on its token AND `*`:
    any create in flight, or decided after t0, makes it `raced`; any create not yet replayed
    makes it wait. The divergence of record 6 is almost never compared."""
    async with shadow_world(ground) as world:
        await world.sql(world.target_db, "UPDATE dcir SET act_code = act_code || 'X' WHERE id = 6")
        base = f"{world.proxy}/v1/datasets/dcir/records"
        done = asyncio.Event()
        reads = 0

        async def creator(n: int) -> None:
            async with aiohttp.ClientSession(headers=AUTH) as session:
                i = 0
                while not done.is_set():
                    async with session.post(base, json=dcir_record(n * 10_000 + i)) as resp:
                        assert resp.status == 201, await resp.text()
                    i += 1
                    await asyncio.sleep(0.05)

        async def reader() -> None:
            nonlocal reads
            async with aiohttp.ClientSession(headers=AUTH) as session:
                for _ in range(60):
                    assert (await get(session, f"{base}/6"))[0] == 200
                    reads += 1
                    await asyncio.sleep(0.05)
            done.set()

        await asyncio.gather(reader(), *(creator(n) for n in range(6)))
        counts = await world.settled()
    assert counts["mismatched"] >= reads // 2, (reads, counts)


# ============================================================================================
# F14 (medium) — a read route's own comparison rules are lost when a write shares its path
# ============================================================================================


async def test_f14_read_route_rules_apply_when_a_write_route_shares_the_path(
    tmp_path: Path,
) -> None:
    """``Dispatcher._routes`` is keyed by path only, so for GET and POST .../records (or GET and
    PUT/PATCH/DELETE .../records/{id}) the route declared last wins — a write route, whose
    ``compare`` is always None (only read routes may declare one). The read route's own rules
    (say `unordered` for its page) are silently replaced by the dataset's: false mismatches
    an SRE cannot fix by configuring the route."""
    import msgspec

    from bascule.config import CompareRules

    listing = "/v1/datasets/{dataset}/records"
    config = offline_config(tmp_path / "bascule.toml")
    own = CompareRules(unordered={"/records": "id"})
    routes = tuple(
        msgspec.structs.replace(r, compare=own) if r.path == listing and r.kind == "read" else r
        for r in config.routes
    )
    config = msgspec.structs.replace(config, routes=routes)
    dispatcher = Dispatcher(config, _Ledger(), {}, lambda s: s)  # type: ignore[arg-type]
    assert dispatcher.rules("dcir", listing).unordered == (("/records", "id"),)
