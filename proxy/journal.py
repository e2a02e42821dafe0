"""The dual-write journal in Postgres: record locks, intents, outcomes, and what may be replayed.

A write in a dual-write stage runs inside :meth:`Journal.locked`: a dedicated session holds the
record's advisory lock (the dataset's, for a write that names no record) from before the intent
until the outcome is recorded. So, for one record, sequence numbers are allocated in lock
order, and an entry is only ever replayed after every earlier open entry of its record (and of
its dataset, when either is dataset-wide) has settled. That rule is evaluated on each entry's
own state — never on a high-water mark, since a lower ``seq`` can commit after a higher one is
visible. If the writer's session ends (the replica died), its lock goes with it and its
unsettled entries are visible as orphans at once (:meth:`Journal.orphans`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from bascule.errors import RecordBusy, StoreError
from cutover.stages import Stage, authority
from cutover.store import reaching_postgres
from proxy.sealing import DATASET_WIDE, Sealer, fence_id, lock_id

JOURNALED_STAGES = ("dualwrite", "shadow", "live", "rampdown")
"""Stages that write both sides: their writes are journaled."""

State = Literal["intent", "pending", "applied", "rejected", "in_doubt", "dead", "skipped"]
OPEN: tuple[State, ...] = ("intent", "pending", "in_doubt", "dead")
"""States that hold back later entries of the same record."""

# Which state may follow which: anything else is a bug, refused by the database update.
_NEXT: dict[str, tuple[State, ...]] = {
    "intent": ("pending", "rejected", "in_doubt"),
    "in_doubt": ("pending", "rejected", "skipped"),
    "pending": ("applied", "dead", "skipped"),
    "dead": ("pending", "skipped"),
}


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    dataset: str
    record: str
    route: str
    method: str
    authority: str
    stage_version: int
    state: State
    status: int | None
    attempts: int
    created_at: datetime
    last_error: str | None


_ENTRY_COLUMNS = (
    "seq, dataset, record, route, method, authority, stage_version, state, status, attempts,"
    " created_at, last_error"
)


_J_COLUMNS = ", ".join(f"j.{c.strip()}" for c in _ENTRY_COLUMNS.split(",")).replace("j.seq", "seq")


_ENTRY_FIELDS = tuple(c.strip() for c in _ENTRY_COLUMNS.split(","))


def _entry(rec: asyncpg.Record) -> Entry:
    return Entry(**{f: rec[f] for f in _ENTRY_FIELDS})


@dataclass(frozen=True, slots=True)
class Fenced:
    """A write's plan as read under its dataset's fence."""

    stage: str
    version: int
    epoch: int
    seq: int | None
    """The journal entry of its intent; None in a stage that writes one side only."""


Guarded = Literal["clear", "raced", "stuck", "lagging"]
"""What the race guard says of a shadow read (:meth:`Journal.race`)."""


class IllegalTransition(RuntimeError):
    """An entry was asked to move to a state its current state cannot lead to."""


class WriterConnection(asyncpg.Connection):
    """A writer's session. Its locks are released by the outcome statement itself, or the
    session is ended on failure (:meth:`Journal.locked`), and it holds no other state: handing
    it back to the pool needs no reset round trip (asyncpg's ``RESET ALL; UNLISTEN *; ...``)."""

    _started: datetime | None = None

    async def backend_start(self) -> datetime:
        """When this session's backend started: with its pid, what names the writer of an
        entry (a pid alone can be reused). Read once per session, not in every intent."""
        if self._started is None:
            self._started = await _read_backend_start(self)
        return self._started

    def get_reset_query(self) -> str:
        return ""


class WriteSession:
    """The session holding a write's record locks; intents are committed through it."""

    def __init__(self, journal: Journal, conn: Any, dataset: str) -> None:
        self.journal = journal
        self.conn = conn
        self.dataset = dataset
        self.unlocked = False
        """Set once the outcome statement has released the locks."""

    async def intent(
        self,
        *,
        record: str,
        route: str,
        method: str,
        authority: str,
        stage_version: int,
        request: dict[str, Any],
        write_epoch: int | None = None,
    ) -> int:
        """Commit the intent of a write with the plan given (tests and tools; the write path
        uses :meth:`plan`, which reads it under the fence); return its sequence number."""
        sealed = self._sealed(request)
        async with reaching_postgres():
            started = await _backend_start(self.conn)
            seq: int = await self.conn.fetchval(
                "INSERT INTO bascule_journal (dataset, record, route, method, authority,"
                " stage_version, writer, writer_pid, writer_started, state, request, write_epoch)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'intent', $10, $11) RETURNING seq",
                self.dataset,
                record,
                route,
                method,
                authority,
                stage_version,
                self.journal.replica,
                self.conn.get_server_pid(),
                started,
                sealed,
                write_epoch,
            )
        return seq

    def _sealed(self, request: dict[str, Any]) -> bytes:
        return self.journal.sealer.seal(
            json.dumps(request, separators=(",", ":")).encode(),
            dataset=self.dataset,
            field="request",
        )

    async def plan(
        self,
        *,
        record: str,
        route: str,
        method: str,
        request: Callable[[], dict[str, Any]],
        expect_journal: bool = True,
    ) -> Fenced:
        """Read the dataset's stage under the fence this session holds and, in a dual-write
        stage, commit the write's intent — in one statement. Under the fence, no change that
        alters writes can commit until this write's outcome is recorded.

        ``expect_journal``: this replica's view says the stage journals writes. When it says
        not, the request is neither built nor sent to Postgres (a body of up to
        ``max_body_bytes`` for nothing); should the stage read under the fence journal it
        after all (the view was behind), the intent follows in a second statement."""
        if not expect_journal:
            async with reaching_postgres():
                stage = await self.conn.fetchrow(
                    "SELECT stage, version, write_epoch FROM bascule_stage WHERE dataset = $1",
                    self.dataset,
                )
            if stage is None:
                raise StoreError(f"no stage is recorded for dataset {self.dataset!r}")
            seq = None
            if stage["stage"] in JOURNALED_STAGES:
                seq = await self.intent(
                    record=record,
                    route=route,
                    method=method,
                    authority=authority(Stage(stage["stage"])).value,
                    stage_version=stage["version"],
                    request=request(),
                    write_epoch=stage["write_epoch"],
                )
            return Fenced(stage["stage"], stage["version"], stage["write_epoch"], seq)
        sealed = self._sealed(request())
        async with reaching_postgres():
            started = await _backend_start(self.conn)
            row = await self.conn.fetchrow(
                "WITH s AS (SELECT stage, version, write_epoch FROM bascule_stage"
                "   WHERE dataset = $1),"
                " ins AS (INSERT INTO bascule_journal (dataset, record, route, method, authority,"
                "   stage_version, write_epoch, writer, writer_pid, writer_started, state,"
                "   request)"
                "   SELECT $1, $2, $3, $4,"
                "     CASE WHEN s.stage IN ('dualwrite', 'shadow') THEN 'source' ELSE 'target' END,"
                "     s.version, s.write_epoch, $5, $6, $7, 'intent', $8"
                "   FROM s WHERE s.stage = ANY($9::text[])"
                "   RETURNING seq)"
                " SELECT s.stage, s.version, s.write_epoch, (SELECT seq FROM ins) AS seq FROM s",
                self.dataset,
                record,
                route,
                method,
                self.journal.replica,
                self.conn.get_server_pid(),
                started,
                sealed,
                list(JOURNALED_STAGES),
            )
        if row is None:
            raise StoreError(f"no stage is recorded for dataset {self.dataset!r}")
        return Fenced(row["stage"], row["version"], row["write_epoch"], row["seq"])

    async def decide(
        self,
        seq: int,
        state: State,
        *,
        status: int | None = None,
        answer: bytes | None = None,
        stage_version: int | None = None,
        fenced: bool = False,
    ) -> None:
        """Record the outcome on this session, and release its locks in the same statement.

        On this session: a write never needs a second connection (with every session of the
        pool held by writers, waiting for another would deadlock). The outcome is flushed like
        the intent: were it lost in a crash, the entry would be back at *intent* as an orphan
        whose answer is unknown — a refused write would then look like one to settle.
        """
        sealed = (
            self.journal.sealer.seal(answer, dataset=self.dataset, field="answer")
            if answer
            else None
        )
        try:
            await self.journal._move(
                seq,
                state,
                status=status,
                answer=sealed,
                stage_version=stage_version,
                conn=self.conn,
                release=True,
                fenced=fenced,
            )
        except IllegalTransition:
            self.unlocked = True  # the statement ran to its end, unlock included
            raise
        self.unlocked = True


async def _read_backend_start(conn: Any) -> datetime:
    started: datetime = await conn.fetchval(
        "SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    )
    return started


async def _backend_start(conn: Any) -> datetime:
    # Through the pool's proxy, a method call reaches the connection itself (attributes set
    # on the proxy would not).
    if hasattr(conn, "backend_start"):
        started: datetime = await conn.backend_start()
        return started
    return await _read_backend_start(conn)


class Journal:
    def __init__(
        self,
        pool: asyncpg.Pool,
        sealer: Sealer,
        replica: str,
        sessions: asyncpg.Pool | None = None,
    ) -> None:
        self.pool = pool
        """For reading and settling entries (the replayer, the resolver, status)."""
        self.sessions = sessions or pool
        """For writes: each holds one session, with its record lock, for its whole life."""
        self.sealer = sealer
        self.replica = replica
        self.guard_timeout = 2.0
        """Seconds a race guard's statement may take (a shadow read is never worth more)."""
        self._woken: set[str] = set()
        """Datasets this replica moved entries of to *pending* since :meth:`take_woken`."""
        self._wake = asyncio.Event()
        """Set while ``_woken`` holds any."""

    @contextlib.asynccontextmanager
    async def locked(
        self, dataset: str, records: Iterable[str], *, wait: float = 10.0
    ) -> AsyncIterator[WriteSession]:
        """Hold the locks of ``records`` (tokens; ``*`` for the whole dataset) for one write.

        A record write holds the dataset's lock shared and its records' locks exclusively, in
        sorted order (no deadlock between writes naming several records); a dataset-wide write
        holds the dataset's lock exclusively. Waiting longer than ``wait`` raises StoreError.
        """
        wanted = sorted(set(records))
        whole = lock_id(dataset, DATASET_WIDE)
        # The dataset's write fence first (shared: writes do not exclude each other; a stage
        # change that alters writes takes it exclusively), then the record locks.
        takes = [f"SELECT pg_advisory_lock_shared({fence_id(dataset)})"]
        if DATASET_WIDE in wanted:
            takes.append(f"SELECT pg_advisory_lock({whole})")
        else:
            takes.append(f"SELECT pg_advisory_lock_shared({whole})")
            takes += [f"SELECT pg_advisory_lock({lock_id(dataset, r)})" for r in wanted]
        # One round trip for the timeout and every lock, taken in this order (the ids are
        # integers computed here, never text from a request).
        statement = "; ".join([f"SET lock_timeout = '{max(1, int(wait * 1000))}ms'", *takes])
        async with reaching_postgres(), self.sessions.acquire() as conn:
            session: WriteSession | None = None
            try:
                try:
                    # The statement's own timeout outlasts the lock wait (the pool's default
                    # command timeout would cut it short, as if Postgres were unreachable).
                    await conn.execute(statement, timeout=wait + 5.0)
                except asyncpg.LockNotAvailableError:
                    raise RecordBusy(
                        f"waited more than {wait:g} s for this record: another write to it, or "
                        "a stage switch of its dataset, held it"
                    ) from None
                session = WriteSession(self, conn, dataset)
                yield session
            except BaseException:
                # A write whose outcome could not be recorded: end the session now, so its
                # entry is an orphan at once instead of when the pool drops the connection.
                with contextlib.suppress(Exception):
                    conn.terminate()
                raise
            finally:
                if session is None or not session.unlocked:
                    with contextlib.suppress(Exception):
                        await conn.execute("SELECT pg_advisory_unlock_all()")

    async def decide(
        self,
        seq: int,
        state: State,
        *,
        status: int | None = None,
        answer: bytes | None = None,
        dataset: str,
        stage_version: int | None = None,
        conn: Any = None,
        error: str | None = None,
    ) -> None:
        """Record an entry's outcome. With ``stage_version``, only if the entry was written
        under that stage version (the epoch check of the outcome transaction)."""
        sealed = self.sealer.seal(answer, dataset=dataset, field="answer") if answer else None
        await self._move(
            seq,
            state,
            status=status,
            answer=sealed,
            stage_version=stage_version,
            conn=conn,
            error=error,
        )

    async def _move(
        self,
        seq: int,
        state: State,
        *,
        status: int | None = None,
        answer: bytes | None = None,
        error: str | None = None,
        stage_version: int | None = None,
        retry_in: float | None = None,
        conn: Any = None,
        release: bool = False,
        fenced: bool = False,
    ) -> None:
        """Move one entry to ``state`` if its state allows it. ``release``: the writer's own
        outcome statement, which also releases its session's locks and commits without
        waiting for the WAL flush (see :meth:`WriteSession.decide`)."""
        allowed = [s for s, nexts in _NEXT.items() if state in nexts]
        update = (
            "UPDATE bascule_journal SET state = $2,"
            " status = coalesce($3, status), answer = coalesce($4, answer),"
            " last_error = coalesce($5, last_error),"
            # When the write reached the authoritative side, as far as anyone can say: its
            # outcome, or the resolution of an in-doubt one (the race guard relies on it).
            " decided_at = CASE WHEN state IN ('intent', 'in_doubt') THEN now()"
            "   ELSE decided_at END,"
            " applied_at = CASE WHEN $2 IN ('applied', 'skipped') THEN now() END,"
            " attempts = attempts + CASE WHEN $7::float8 IS NULL THEN 0 ELSE 1 END,"
            " next_attempt_at = now() + make_interval(secs => coalesce($7::float8, 0))"
            " WHERE seq = $1 AND state = ANY($6::text[])"
            " AND ($8::bigint IS NULL OR stage_version = $8)"
            + (
                " AND write_epoch = (SELECT s.write_epoch FROM bascule_stage s"
                "   WHERE s.dataset = bascule_journal.dataset)"
                if fenced
                else ""
            )
            + " RETURNING dataset"
        )
        if release:
            # A data-modifying WITH runs to completion whatever the outer query reads.
            update = (
                f"WITH moved AS ({update}) SELECT (SELECT dataset FROM moved),"
                " pg_advisory_unlock_all()"
            )
        async with reaching_postgres():
            done = await (conn or self.pool).fetchval(
                update,
                seq,
                state,
                status,
                answer,
                error,
                allowed,
                retry_in,
                stage_version,
            )
        if done is None:
            raise IllegalTransition(f"journal entry {seq} cannot move to {state!r} from its state")
        if state == "pending":
            self.wake(done)

    def wake(self, dataset: str) -> None:
        """Say that this replica has an entry of ``dataset`` to replay: wakes its idle
        replayer at once, if it holds that dataset's lease (entries journaled by other
        replicas are found by its polling)."""
        self._woken.add(dataset)
        self._wake.set()

    def take_woken(self) -> set[str]:
        """The datasets woken since the last call, forgotten here."""
        woken, self._woken = self._woken, set()
        self._wake.clear()
        return woken

    async def woken(self) -> None:
        """Until a dataset is woken (at once if one is)."""
        await self._wake.wait()

    async def applied(self, seq: int) -> None:
        await self._move(seq, "applied")

    async def retry_later(self, seq: int, error: str, delay: float) -> None:
        """Keep a pending entry pending, to be tried again after ``delay`` seconds."""
        async with reaching_postgres():
            await self.pool.execute(
                "UPDATE bascule_journal SET attempts = attempts + 1, last_error = $2,"
                " next_attempt_at = now() + make_interval(secs => $3) WHERE seq = $1"
                " AND state = 'pending'",
                seq,
                error,
                delay,
            )

    async def dead(self, seq: int, error: str) -> None:
        await self._move(seq, "dead", error=error)

    async def replayable(self, dataset: str, limit: int = 100, run: int = 1) -> list[Entry]:
        """Pending entries whose every earlier open entry of the same record — or of the whole
        dataset, when either is dataset-wide — has settled or comes before it in this answer;
        in order. ``run``: how many of one record's consecutive pending entries may come
        (the replayer applies them one after the other), so a busy record is not drained one
        entry per round."""
        return [_entry(r) for r in await self._replayable(dataset, limit, run, "")]

    async def wave(
        self, dataset: str, limit: int = 100, run: int = 1
    ) -> tuple[list[Entry], dict[int, tuple[dict[str, Any], bytes | None]]]:
        """:meth:`replayable` and the opened request and answer of each entry, in one query
        (the replayer's round)."""
        rows = await self._replayable(dataset, limit, run, ", j.request, j.answer")
        entries = [_entry(r) for r in rows]
        return entries, {
            entry.seq: self._opened(dataset, r["request"], r["answer"])
            for entry, r in zip(entries, rows, strict=True)
        }

    async def _replayable(
        self, dataset: str, limit: int, run: int, extra: str
    ) -> list[asyncpg.Record]:
        # One pass over the open entries (a partial index). Per record, the entries before
        # the first that is not pending-and-due; none after an earlier open dataset-wide
        # entry; a dataset-wide entry only when it is the dataset's first open entry. The
        # bounds are uncorrelated subqueries, computed once: as a joined aggregate the planner
        # re-ran it for every row (3.6 s on a 10,000-entry backlog). The wave is chosen before
        # the entries are read (their sealed bodies with them): joined first, every open
        # entry was read and sorted whole (75-90 ms per 1,024 of a 10,000-entry backlog on
        # the 2-core bench machine, 44 ms chosen first).
        async with reaching_postgres():
            rows: list[asyncpg.Record] = await self.pool.fetch(
                "WITH open AS MATERIALIZED (SELECT seq, record, state, next_attempt_at"
                "   FROM bascule_journal WHERE dataset = $1 AND state = ANY($3::text[])),"
                " chains AS (SELECT seq, record, row_number() OVER w AS pos,"
                "   count(*) FILTER (WHERE state <> 'pending' OR next_attempt_at > now())"
                "     OVER w AS blocked"
                "   FROM open WINDOW w AS (PARTITION BY record ORDER BY seq)),"
                " wave AS (SELECT seq FROM chains c WHERE c.blocked = 0 AND c.pos <= $4"
                "   AND CASE WHEN c.record = '*' THEN c.seq = (SELECT min(seq) FROM open)"
                "     ELSE c.seq < coalesce((SELECT min(seq) FROM open WHERE record = '*'),"
                "       9223372036854775807) END"
                "   ORDER BY seq LIMIT $2)"
                f" SELECT {_J_COLUMNS}{extra} FROM bascule_journal j JOIN wave USING (seq)"
                " ORDER BY j.seq",
                dataset,
                limit,
                list(OPEN),
                run,
            )
        return rows

    async def race(
        self,
        dataset: str,
        records: tuple[str, ...] | None,
        *,
        t0: float,
        t1: float,
        serving: str,
        creates: tuple[str, ...] = (),
    ) -> Guarded:
        """The race guard of a shadow read (``shadow/dispatch.py``): may the answer the
        ``serving`` side gave to a read asked at ``t0`` be compared with the answer the other
        side gave to the same read sent at ``t1``? Times are epoch seconds on the database's
        clock, never later than the real ones. The writes looked at are those of ``records``
        of ``dataset`` (every write of the dataset when None), less dataset-wide writes on the
        routes in ``creates`` (``"METHOD template"``: a create never touches a record both
        sides already hold).

        A write's ``decided_at`` follows the authoritative side's commit (an in-doubt write's,
        its resolution); its ``applied_at`` follows the other side's.

        - ``raced``: a write is at intent or in doubt; or the serving side is its authority
          and it was decided after ``t0``; or the serving side gets it by replay and did not
          have it at ``t0``. It may be in one answer and not the other.
        - ``stuck``: a write in the serving answer is dead: its replay will not come by itself.
        - ``lagging``: a write in the serving answer had not reached the other side when the
          shadow read was sent (pending, or applied after ``t1``): ask again once it has.
        - ``clear``: compare.

        A few EXISTS probes, each an index range (migration 6) however large the backlog; one
        statement text for record reads and another for dataset reads, so neither inherits
        the other's generic plan."""
        args: list[Any]
        if records is None:
            key, args = "dataset = $1", [dataset]
        else:
            key, args = "dataset = $1 AND record = ANY($2::text[])", [dataset, list(records)]
        n = len(args)
        if creates:
            key += f" AND NOT (record = '*' AND (method || ' ' || route) = ANY(${n + 1}::text[]))"
            args.append(list(creates))
            n += 1
        t0_, t1_, serving_ = f"to_timestamp(${n + 1})", f"to_timestamp(${n + 2})", f"${n + 3}"
        args += [t0, t1, serving]
        open_ = f"FROM bascule_journal WHERE {key} AND state IN ('pending', 'dead')"
        settled = f"FROM bascule_journal WHERE {key} AND state IN ('applied', 'skipped')"
        sql = (
            "SELECT CASE"
            f" WHEN EXISTS (SELECT 1 FROM bascule_journal WHERE {key}"
            "   AND state IN ('intent', 'in_doubt'))"
            f"   OR EXISTS (SELECT 1 {open_} AND authority = {serving_}"
            f"     AND decided_at > {t0_})"
            f"   OR EXISTS (SELECT 1 {open_} AND authority <> {serving_})"
            f"   OR EXISTS (SELECT 1 {settled} AND applied_at > {t0_}"
            f"     AND (decided_at > {t0_} OR (authority <> {serving_} AND state = 'applied')))"
            " THEN 'raced'"
            f" WHEN EXISTS (SELECT 1 {open_} AND state = 'dead' AND authority = {serving_})"
            " THEN 'stuck'"
            f" WHEN EXISTS (SELECT 1 {open_} AND state = 'pending' AND authority = {serving_})"
            f"   OR EXISTS (SELECT 1 {settled} AND state = 'applied' AND applied_at >= {t1_}"
            f"     AND authority = {serving_})"
            " THEN 'lagging'"
            " ELSE 'clear' END"
        )
        async with reaching_postgres():
            verdict: Guarded = await self.pool.fetchval(sql, *args, timeout=self.guard_timeout)
        return verdict

    async def in_state(self, dataset: str, state: State) -> list[Entry]:
        async with reaching_postgres():
            rows = await self.pool.fetch(
                f"SELECT {_ENTRY_COLUMNS} FROM bascule_journal"
                " WHERE dataset = $1 AND state = $2 ORDER BY seq",
                dataset,
                state,
            )
        return [_entry(r) for r in rows]

    async def payloads(
        self, entries: list[Entry]
    ) -> dict[int, tuple[dict[str, Any], bytes | None]]:
        """The opened request and answer of several entries, in one query (the replayer's)."""
        async with reaching_postgres():
            rows = await self.pool.fetch(
                "SELECT seq, request, answer FROM bascule_journal WHERE seq = ANY($1::bigint[])",
                [e.seq for e in entries],
            )
        datasets = {e.seq: e.dataset for e in entries}
        return {r["seq"]: self._opened(datasets[r["seq"]], r["request"], r["answer"]) for r in rows}

    def _opened(
        self, dataset: str, request: bytes, answer: bytes | None
    ) -> tuple[dict[str, Any], bytes | None]:
        return (
            json.loads(self.sealer.open(request, dataset=dataset, field="request")),
            self.sealer.open(answer, dataset=dataset, field="answer")
            if answer is not None
            else None,
        )

    async def applied_many(self, seqs: list[int]) -> None:
        """Mark pending entries applied, in one statement."""
        if not seqs:
            return
        async with reaching_postgres():
            await self.pool.execute(
                "UPDATE bascule_journal SET state = 'applied', applied_at = now()"
                " WHERE seq = ANY($1::bigint[]) AND state = 'pending'",
                seqs,
            )

    async def request_of(self, entry: Entry) -> dict[str, Any]:
        async with reaching_postgres():
            sealed = await self.pool.fetchval(
                "SELECT request FROM bascule_journal WHERE seq = $1", entry.seq
            )
        result: dict[str, Any] = json.loads(
            self.sealer.open(sealed, dataset=entry.dataset, field="request")
        )
        return result

    async def answer_of(self, entry: Entry) -> bytes | None:
        async with reaching_postgres():
            sealed = await self.pool.fetchval(
                "SELECT answer FROM bascule_journal WHERE seq = $1", entry.seq
            )
        if sealed is None:
            return None
        return self.sealer.open(sealed, dataset=entry.dataset, field="answer")

    async def orphans(self, dataset: str | None = None, older_than: float = 0.0) -> list[Entry]:
        """Entries still at ``intent`` whose writer's session has ended: its lock is gone with
        it, so nobody else will ever record their outcome. ``older_than``: only those whose
        intent is at least that many seconds old, by the database's clock (no skew)."""
        async with reaching_postgres():
            rows = await self.pool.fetch(
                f"SELECT {_ENTRY_COLUMNS} FROM bascule_journal j"
                " WHERE j.state = 'intent' AND ($1::text IS NULL OR j.dataset = $1)"
                " AND j.created_at < now() - make_interval(secs => $2)"
                " AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a"
                "   WHERE a.pid = j.writer_pid AND a.backend_start = j.writer_started)"
                " ORDER BY j.seq",
                dataset,
                older_than,
            )
        return [_entry(r) for r in rows]


async def backlog(pool: asyncpg.Pool) -> dict[str, dict[str, Any]]:
    """Per dataset: backlog (intent + pending), oldest pending age, in doubt, dead."""
    async with reaching_postgres():
        rows = await pool.fetch(
            "SELECT dataset,"
            " count(*) FILTER (WHERE state IN ('intent', 'pending')) AS backlog,"
            " extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'pending'))"
            "   AS oldest_pending_seconds,"
            " count(*) FILTER (WHERE state = 'in_doubt') AS in_doubt,"
            " count(*) FILTER (WHERE state = 'dead') AS dead"
            " FROM bascule_journal WHERE state = ANY($1::text[]) GROUP BY dataset",
            list(OPEN),
        )
    return {
        r["dataset"]: {
            "backlog": r["backlog"],
            "oldest_pending_seconds": (
                round(float(r["oldest_pending_seconds"]), 3)
                if r["oldest_pending_seconds"] is not None
                else None
            ),
            "in_doubt": r["in_doubt"],
            "dead": r["dead"],
        }
        for r in rows
    }


EMPTY_BACKLOG: dict[str, Any] = {
    "backlog": 0,
    "oldest_pending_seconds": None,
    "in_doubt": 0,
    "dead": 0,
}


async def listing(
    pool: asyncpg.Pool, state: str, dataset: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Entries in ``state``: what SREs see (never a body: those stay sealed)."""
    async with reaching_postgres():
        rows = await pool.fetch(
            "SELECT seq, dataset, record, route, method, authority, state, status, attempts,"
            " last_error, created_at FROM bascule_journal"
            " WHERE state = $1 AND ($2::text IS NULL OR dataset = $2) ORDER BY seq LIMIT $3",
            state,
            dataset,
            limit,
        )
    return [
        {**dict(r), "record": r["record"][:12], "created_at": r["created_at"].isoformat()}
        for r in rows
    ]


async def retry(pool: asyncpg.Pool, seq: int | None, *, all_dead: bool = False) -> int:
    """Send dead entries (one, or all) back to the replayer; return how many."""
    async with reaching_postgres():
        rows = await pool.fetch(
            "UPDATE bascule_journal SET state = 'pending', attempts = 0, next_attempt_at = now()"
            " WHERE state = 'dead' AND ($1::bigint IS NULL OR seq = $1) AND ($2 OR seq = $1)"
            " RETURNING seq",
            seq,
            all_dead,
        )
    return len(rows)


async def skip(
    pool: asyncpg.Pool,
    seq: int,
    *,
    actor: str,
    reason: str,
    details: dict[str, str] | None = None,
) -> str:
    """Give up replaying an entry, audited in the same transaction; return its dataset."""
    async with reaching_postgres(), pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE bascule_journal SET state = 'skipped', applied_at = now()"
            " WHERE seq = $1 AND state IN ('pending', 'in_doubt', 'dead')"
            " RETURNING dataset, state",
            seq,
        )
        if row is None:
            raise IllegalTransition(
                f"journal entry {seq} does not exist or is not pending, in doubt or dead"
            )
        await conn.execute(
            "INSERT INTO bascule_audit (dataset, action, actor, reason, details)"
            " VALUES ($1, 'journal-skip', $2, $3, $4::jsonb)",
            row["dataset"],
            actor,
            reason,
            json.dumps({**(details or {}), "seq": seq}),
        )
        return str(row["dataset"])


async def purge(pool: asyncpg.Pool, retention_seconds: float) -> int:
    """Delete settled entries older than the retention period; return how many."""
    async with reaching_postgres():
        rows = await pool.fetch(
            "DELETE FROM bascule_journal WHERE seq IN (SELECT seq FROM bascule_journal"
            " WHERE state IN ('applied', 'rejected', 'skipped')"
            " AND coalesce(applied_at, decided_at, created_at)"
            "   < now() - make_interval(secs => $1) LIMIT 10000) RETURNING seq",
            retention_seconds,
        )
    return len(rows)
