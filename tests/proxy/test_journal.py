"""The journal on real Postgres: per-record order from each entry's own state, hold-backs,
late commits of lower sequence numbers, orphans of a dead writer, and nothing in the clear."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bascule.errors import RecordBusy
from bascule.sealing import DATASET_WIDE, Namer, Sealer
from bascule.state.journal import Journal, queries
from bascule.state.journal.entries import OPEN, IllegalTransition
from bascule.state.journal.guard import RaceGuard
from bascule.state.journal.writes import WriterConnection, WriteSession
from bascule.state.postgres import open_pool
from refapi.lab import migrate_state
from tests.scans import skipping

KEY = bytes(range(32))
NAMER = Namer(KEY)
R1, R2 = NAMER.record("dcir", "1"), NAMER.record("dcir", "2")


@pytest.fixture
async def journal(pg_url: str) -> AsyncIterator[Journal]:
    await migrate_state(pg_url)
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=10)
    yield Journal(pool, Sealer(KEY), replica="test-replica")
    await pool.close()


async def write(journal: Journal, record: str, state: str = "pending", body: str = "{}") -> int:
    async with journal.locked("dcir", [record]) as session:
        seq = await session.intent(
            record=record,
            route="/v1/datasets/{dataset}/records/{id}",
            method="PUT",
            authority="source",
            stage_version=2,
            request={"target": "/v1/datasets/dcir/records/1", "body": body},
        )
    if state != "intent":
        await journal.decide(seq, state, status=200, dataset="dcir")  # type: ignore[arg-type]
    return seq


async def seqs(journal: Journal) -> list[int]:
    return [e.seq for e in await journal.replayable("dcir")]


async def test_one_record_replays_in_order_others_do_not_wait(journal: Journal) -> None:
    a1, a2 = await write(journal, R1), await write(journal, R1)
    b1 = await write(journal, R2)
    assert await seqs(journal) == [a1, b1]  # a2 waits for a1; b1 does not
    await journal.applied(a1)
    assert await seqs(journal) == [a2, b1]


async def test_unsettled_entries_hold_back_their_record_only(journal: Journal) -> None:
    held = await write(journal, R1, state="intent")
    later = await write(journal, R1)
    other = await write(journal, R2)
    assert await seqs(journal) == [other]
    await journal.decide(held, "in_doubt", dataset="dcir")
    assert await seqs(journal) == [other]  # in doubt still holds its record back
    await journal.decide(held, "rejected", dataset="dcir")
    assert await seqs(journal) == [later, other]


async def test_a_dataset_wide_write_orders_with_everything(journal: Journal) -> None:
    before = await write(journal, R1)
    wide = await write(journal, DATASET_WIDE)
    after = await write(journal, R2)
    assert await seqs(journal) == [before]
    await journal.applied(before)
    assert await seqs(journal) == [wide]
    await journal.applied(wide)
    assert await seqs(journal) == [after]


async def test_runs_of_one_record_come_in_order_and_stop_at_what_holds_them(
    journal: Journal,
) -> None:
    a1, a2, a3 = [await write(journal, R1) for _ in range(3)]
    held = await write(journal, R1, state="in_doubt")
    a5 = await write(journal, R1)
    b1, b2 = await write(journal, R2), await write(journal, R2)
    wide = await write(journal, DATASET_WIDE)
    c1 = await write(journal, NAMER.record("dcir", "3"))
    runs = [e.seq for e in await journal.replayable("dcir", run=16)]
    # R1's entries up to the one in doubt; R2's whole chain; nothing at or after the
    # dataset-wide entry, which waits for every earlier one.
    assert runs == [a1, a2, a3, b1, b2]
    assert [e.seq for e in await journal.replayable("dcir", run=2)] == [a1, a2, b1, b2]
    assert [e.seq for e in await journal.replayable("dcir", run=16, limit=4)] == [a1, a2, a3, b1]
    await journal.retry_later(b1, "status 503", 60.0)  # not due: holds b2 back too
    assert [e.seq for e in await journal.replayable("dcir", run=16)] == [a1, a2, a3]
    for seq in (a1, a2, a3, b1, b2):
        await journal._move(seq, "skipped")
    await journal.decide(held, "rejected", dataset="dcir")
    assert [e.seq for e in await journal.replayable("dcir", run=16)] == [a5]
    await journal.applied(a5)
    assert [e.seq for e in await journal.replayable("dcir", run=16)] == [wide]
    await journal.applied(wide)
    assert [e.seq for e in await journal.replayable("dcir", run=16)] == [c1]


async def test_a_lower_seq_committed_late_is_still_replayed(journal: Journal, pg_url: str) -> None:
    slow = await asyncpg.connect(pg_url)
    try:
        tx = slow.transaction()
        await tx.start()
        low = await slow.fetchval(
            "INSERT INTO bascule_journal (dataset, record, route, method, authority,"
            " stage_version, writer, writer_pid, writer_started, state, request)"
            " VALUES ('dcir', $1, '/r', 'PUT', 'source', 2, 'x', 0, now(), 'pending', '\\x00')"
            " RETURNING seq",
            R2,
        )
        high = await write(journal, R1)
        assert high > low
        assert await seqs(journal) == [high]  # the lower one is not visible yet
        await journal.applied(high)
        await tx.commit()
        assert await seqs(journal) == [low]  # no high-water mark skipped it
    finally:
        await slow.close()


async def test_open_entry_scans_skip_what_the_queue_left_behind(pg_url: str) -> None:
    # Each write leaves two dead row versions in the journal, with entries in the open-entry
    # indexes, until VACUUM. The replayer's wave, the resolver's look (twice a second) and the
    # gauges' backlog read the open entries by index scan, which marks dead entries and skips
    # them after: a bitmap scan, which the planner chose with no statistics, read every one of
    # them again on every call (migration 0011). No statistics and no autovacuum here, as on a
    # new journal on the bench machine's server.
    await migrate_state(pg_url)
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1)
    admin = await asyncpg.connect(pg_url)
    try:
        journal = Journal(pool, Sealer(KEY), replica="test-replica")
        await admin.execute("ALTER TABLE bascule_journal SET (autovacuum_enabled = false)")
        insert = (
            "INSERT INTO bascule_journal (dataset, record, route, method, authority,"
            " stage_version, writer, writer_pid, writer_started, state, request)"
            " SELECT 'dcir', 'r' || i, '/r', 'PUT', 'source', 2, 'w', 0, now(), $1,"
            " convert_to(repeat('x', 600), 'UTF8') FROM generate_series(1, $2) AS i"
        )
        await admin.execute(insert, "intent", 10_000)
        await admin.execute("UPDATE bascule_journal SET state = 'pending'")
        await admin.execute("UPDATE bascule_journal SET state = 'applied'")
        for state in ("intent", "pending", "in_doubt", "dead", "rejected", "skipped"):
            await admin.execute(insert, state, 1)

        async def look() -> None:
            await journal.wave("dcir")
            await journal.orphans("dcir")
            await journal.in_doubt("dcir")
            await queries.backlog(pool)

        first, reads = await skipping(admin, pool, look)
        assert first > 1000  # the 20,000 dead versions: what a bitmap scan reads on every call
        # Then the few open entries and their pages, not the 1,800-odd pages of dead versions.
        assert reads[-1] < 100, (first, reads)
        states = await admin.fetch("SELECT DISTINCT state FROM bascule_journal_open('dcir')")
        assert {r["state"] for r in states} == set(OPEN)
        unsettled = await admin.fetch("SELECT state FROM bascule_journal_unsettled('dcir')")
        assert sorted(r["state"] for r in unsettled) == ["in_doubt", "intent"]
        with pytest.raises(asyncpg.NullValueNotAllowedError, match="a dataset is needed"):
            await admin.fetch("SELECT * FROM bascule_journal_unsettled(NULL)")
    finally:
        await admin.close()
        await pool.close()


async def test_transitions_are_checked(journal: Journal) -> None:
    seq = await write(journal, R1)
    await journal.applied(seq)
    with pytest.raises(IllegalTransition):
        await journal.decide(seq, "pending", dataset="dcir")
    intent = await write(journal, R2, state="intent")
    with pytest.raises(IllegalTransition):
        await journal.decide(intent, "pending", dataset="dcir", stage_version=99)  # epoch moved


async def test_a_write_holds_its_record_lock_against_other_replicas(journal: Journal) -> None:
    order: list[str] = []

    async def hold() -> None:
        async with journal.locked("dcir", [R1]):
            order.append("first in")
            await asyncio.sleep(0.3)
            order.append("first out")

    async def wait_then_take() -> None:
        await asyncio.sleep(0.05)
        async with journal.locked("dcir", [R1]):
            order.append("second in")

    async def other_record() -> None:
        await asyncio.sleep(0.05)
        async with journal.locked("dcir", [R2]):
            order.append("other record")

    await asyncio.gather(hold(), wait_then_take(), other_record())
    assert order == ["first in", "other record", "first out", "second in"]
    with pytest.raises(RecordBusy, match=r"waited more than 0.2 s for this record"):
        async with journal.locked("dcir", [R1]):
            async with journal.locked("dcir", [R1], wait=0.2):
                pass


async def test_a_dead_writer_leaves_orphans_at_once(journal: Journal, pg_url: str) -> None:
    async with journal.locked("dcir", [R1]) as session:
        seq = await session.intent(
            record=R1,
            route="/r",
            method="PUT",
            authority="source",
            stage_version=2,
            request={"body": "x"},
        )
        assert [e.seq for e in await journal.orphans("dcir")] == []  # its writer is alive
        pid = await session.conn.fetchval("SELECT pg_backend_pid()")
        admin = await asyncpg.connect(pg_url)
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await admin.close()
        await asyncio.sleep(0.2)
        assert [e.seq for e in await journal.orphans("dcir")] == [seq]
        # The lock went with the session: another writer can take the record now.
        async with journal.locked("dcir", [R1], wait=1.0):
            pass


async def test_the_outcome_statement_releases_the_writers_locks(
    journal: Journal, pg_url: str
) -> None:
    # The proxy's writer pool: connections handed back with no reset round trip, one session.
    sessions = await open_pool(pg_url, max_size=1, connection_class=WriterConnection)
    writers = Journal(journal.pool, journal.sealer, "writer", sessions=sessions)

    async def intent(session: WriteSession, record: str) -> int:
        return await session.intent(
            record=record,
            route="/r",
            method="PUT",
            authority="source",
            stage_version=2,
            request={"body": "x"},
        )

    try:
        async with writers.locked("dcir", [R1]) as session:
            done = await intent(session, R1)
            await session.decide(done, "pending", status=200, stage_version=2)
            # Still inside the write: another replica can already take the record.
            async with journal.locked("dcir", [R1], wait=0.5):
                pass
        async with sessions.acquire() as conn:  # reused with no reset: it holds no lock
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
                conn.get_server_pid(),
            )
            flushed = await conn.fetchval("SHOW synchronous_commit")  # nothing left changed
        assert (held, flushed) == (0, "on")
        with pytest.raises(IllegalTransition):
            async with writers.locked("dcir", [R1]) as session:
                refused = await intent(session, R1)
                await session.decide(refused, "pending", status=200, stage_version=99)
        # A write whose outcome was refused ends its session: an orphan at once, named by the
        # pid and start time read once per session.
        await asyncio.sleep(0.2)
        assert [e.seq for e in await journal.orphans("dcir")] == [refused]
        rows = await journal.pool.fetch("SELECT seq, state FROM bascule_journal")
        states = {r["seq"]: r["state"] for r in rows}
        assert states == {done: "pending", refused: "intent"}
    finally:
        await sessions.close()


async def test_nothing_readable_in_the_journal_table(journal: Journal, pg_url: str) -> None:
    secret = '{"patient_id": "P00c0ffee0000beef", "amount": 42.5}'
    seq = await write(journal, NAMER.record("dcir", "P00c0ffee0000beef"), "intent", secret)
    await journal.decide(seq, "pending", status=201, answer=secret.encode(), dataset="dcir")
    conn = await asyncpg.connect(pg_url)
    try:
        dump = " ".join(
            str(v)
            for row in await conn.fetch("SELECT * FROM bascule_journal")
            for v in row.values()
        )
        raw = b"".join(
            bytes(v)
            for row in await conn.fetch("SELECT request, answer FROM bascule_journal")
            for v in row.values()
            if v is not None
        )
    finally:
        await conn.close()
    for needle in ("P00c0ffee0000beef", "42.5", "patient_id"):
        assert needle not in dump
        assert needle.encode() not in raw
    entry = (await journal.replayable("dcir"))[0]
    assert (await journal.request_of(entry))["body"] == secret
    assert await journal.answer_of(entry) == secret.encode()


async def db_now(journal: Journal) -> float:
    return float(await journal.pool.fetchval("SELECT extract(epoch FROM clock_timestamp())"))


async def test_race_guard_of_shadow_reads(journal: Journal) -> None:
    """What a shadow read of record 1 (or of the whole dataset), served by the source (the
    authority) at t0 and sent to the target at t1, may compare."""
    mine, whole = (R1, DATASET_WIDE), None

    guard = RaceGuard(journal.pool)

    async def race(
        records: tuple[str, ...] | None, t0: float, t1: float, creates: tuple[str, ...] = ()
    ) -> str:
        return await guard.race("dcir", records, t0=t0, t1=t1, serving="source", creates=creates)

    t = await db_now(journal)
    assert await race(mine, t, t) == "clear"

    before = await write(journal, R1)  # decided (pending) before t0
    t0 = await db_now(journal)
    # In the serving side's answer, not yet on the other side: wait for it.
    assert await race(mine, t0, t0) == "lagging"
    await journal.applied(before)
    # Applied after the shadow read was sent: that read may not have it, still lagging...
    assert await race(mine, t0, t0) == "lagging"
    # ...but a shadow read sent now has it.
    assert await race(mine, t0, await db_now(journal)) == "clear"

    # Another record's write after t0 races a read of the dataset, not of record 1.
    t1 = await db_now(journal)
    other = await write(journal, R2)
    assert await race(mine, t0, t1) == "clear"
    assert await race(whole, t0, t1) == "raced"
    await journal.applied(other)
    assert await race(whole, t0, t1) == "raced"  # applied, but decided after t0
    assert await guard.race("pmsi", whole, t0=t0, t1=t1, serving="source") == "clear"

    # A write of record 1 in flight (no outcome yet) or decided after t0: raced, even applied.
    t2 = await db_now(journal)
    flight = await write(journal, R1, state="intent")
    assert await race(mine, t2, t2) == "raced"
    await journal.decide(flight, "pending", status=200, dataset="dcir")
    await journal.applied(flight)
    assert await race(mine, t2, t2) == "raced"

    # A refused write changed nothing on either side.
    t3 = await db_now(journal)
    await write(journal, R1, state="rejected")
    assert await race(mine, t3, t3) == "clear"

    # In doubt: it may or may not be on the serving side. Resolved, it counts from then on.
    doubt = await write(journal, R1, state="in_doubt")
    t4 = await db_now(journal)
    assert await race(mine, t4, t4) == "raced"
    await journal.decide(doubt, "pending", status=200, dataset="dcir")
    await journal.applied(doubt)
    assert await race(mine, t4, await db_now(journal)) == "raced"  # resolved after t4
    t5 = await db_now(journal)
    assert await race(mine, t5, t5) == "clear"

    # A dead write in the serving answer: its replay will not come by itself.
    dead = await write(journal, R1)
    await journal.dead(dead, "409")
    t6 = await db_now(journal)
    assert await race(mine, t6, t6) == "stuck"
    await journal.decide(dead, "skipped", dataset="dcir")  # an SRE gave up on it
    assert await race(mine, t6, t6) == "clear"  # the divergence is real now: compare

    # The target is the authority, but this replica still serves the source (its view is
    # behind a switch): a write the source gets by replay is raced until replayed before t0.
    by_target = await write(journal, R1)
    await journal.pool.execute(
        "UPDATE bascule_journal SET authority = 'target' WHERE seq = $1", by_target
    )
    t7 = await db_now(journal)
    assert await race(mine, t7, t7) == "raced"
    await journal.applied(by_target)
    assert await race(mine, t7, await db_now(journal)) == "raced"  # replayed after t7
    t8 = await db_now(journal)
    assert await race(mine, t8, t8) == "clear"

    # A create (dataset-wide) after t8 races every read of the dataset, and a record read
    # unless both sides hold the record (then the create is not it).
    t9 = await db_now(journal)
    await write(journal, DATASET_WIDE)
    assert await race(mine, t9, t9) == "raced"
    creates = ("PUT /v1/datasets/{dataset}/records/{id}",)  # how `write` journals it
    assert await race(mine, t9, t9, creates=creates) == "clear"
    assert await race(whole, t9, t9) == "raced"
