"""A write's session: the dataset's fence and the record locks, its intent and its outcome.

A write in a dual-write stage runs inside :meth:`WriteLocks.locked`: a dedicated session holds
the dataset's write fence (shared) and the record's advisory lock (the dataset's, for a write
that names no record) from before the intent until the outcome is recorded. So, for one record,
sequence numbers are allocated in lock order. The plan (stage, version, write epoch) is read
under the fence, in the statement that commits the intent; a change that alters writes takes
the fence exclusively (``cutover/switch.py``). If the writer's session ends, its locks go with
it and its unsettled entry is an orphan at once (:data:`~bascule.state.journal.entries.ORPHANED`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import orjson

from bascule import telemetry
from bascule.errors import RecordBusy, StoreError
from bascule.sealing import DATASET_WIDE, fence_id, lock_id
from bascule.stages import ORDER, Stage, authority
from bascule.state.journal.core import JournalCore
from bascule.state.journal.entries import (
    AUTHORITY_SQL,
    JOURNALED_STAGES,
    IllegalTransition,
    State,
)
from bascule.state.postgres import reaching_postgres

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Fenced:
    """A write's plan as read under its dataset's fence."""

    stage: str
    version: int
    epoch: int
    seq: int | None
    """The journal entry of its intent; None in a stage that writes one side only."""


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

    def __init__(self, journal: JournalCore, conn: Any, dataset: str) -> None:
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
                " stage_version, writer, writer_pid, writer_started, state, request, write_epoch,"
                " traceparent)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'intent', $10, $11, $12)"
                " RETURNING seq",
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
                telemetry.traceparent_now(),
            )
        return seq

    def _sealed(self, request: dict[str, Any]) -> bytes:
        return _seal(self.journal, self.dataset, request)

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
                "   request, traceparent)"
                "   SELECT $1, $2, $3, $4,"
                f"     {AUTHORITY_SQL},"
                "     s.version, s.write_epoch, $5, $6, $7, 'intent', $8, $10"
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
                telemetry.traceparent_now(),
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
        record: str | None = None,
        request: dict[str, Any] | None = None,
    ) -> None:
        """Record the outcome on this session, and release its locks in the same statement.
        ``record``: the record a create turned out to make (its answer names it): from then on
        the entry is that record's, and waits for no write to any other. ``request``: the
        request with its body, for an outcome that may be replayed or re-sent (the intent is
        journaled without it, so that a refused write never leaves its body in the journal).

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
                record=record,
                request=None if request is None else self._sealed(request),
            )
        except IllegalTransition:
            self.unlocked = True  # the statement ran to its end, unlock included
            raise
        self.unlocked = True


def _seal(journal: JournalCore, dataset: str, request: dict[str, Any]) -> bytes:
    # orjson: the same compact JSON as json.dumps(separators=(",", ":")) but for non-ASCII
    # text, kept as UTF-8 instead of escaped (both read back alike), in a tenth of the time.
    try:
        text = orjson.dumps(request)
    except orjson.JSONEncodeError:  # text orjson refuses (a lone surrogate): escaped instead
        text = json.dumps(request, separators=(",", ":")).encode()
    return journal.sealer.seal(text, dataset=dataset, field="request")


IN_ALL = 3.0
"""Seconds a write's locks may take in all beyond its wait for one of them."""
SILENT_AFTER = 2.0
"""Seconds past the server's own bound after which a lock statement's session is silent (a
partition), not busy: together, the 15 s the client allowed a write's locks before."""


def _timed_out(asked: float, bound: float) -> bool:
    """A statement sent at ``asked`` (monotonic) was cancelled at its ``bound``, by its own
    ``statement_timeout``, not earlier by another session."""
    return time.monotonic() - asked >= bound * 0.9


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


class WriteLocks(JournalCore):
    """The fence and the record locks a write holds for its whole life."""

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[Any]:
        """One of the writers' sessions, waited for ``session_wait`` at most: a replica whose
        sessions are all busy, or whose server refuses new ones (``max_connections``, a role's
        ``CONNECTION LIMIT``), refuses the write at once (:class:`StoreError`) instead of
        holding the researcher until a session frees up."""
        try:
            conn = await self.sessions.acquire(timeout=self.session_wait)
        except TimeoutError:
            size = self.sessions.get_max_size()
            raise StoreError(
                f"no journal session within {self.session_wait:g} s (this replica's "
                f"{size} are all busy, or the state Postgres refuses new sessions)"
            ) from None
        try:
            yield conn
        finally:
            await self.sessions.release(conn)

    @contextlib.asynccontextmanager
    async def begin(
        self,
        dataset: str,
        record: str,
        *,
        route: str,
        method: str,
        request: Callable[[], dict[str, Any]],
        expect_journal: bool = True,
        wait: float = 10.0,
    ) -> AsyncIterator[tuple[WriteSession, Fenced]]:
        """The write path's first round trip: take the dataset's fence and ``record``'s locks
        (as :meth:`locked`), read the stage under them and, in a dual-write stage, commit the
        write's intent — one statement, ``bascule_write_begin`` (migration 0010): a VOLATILE
        function, so its stage read takes a snapshot of its own once the locks are held. Yields
        the session holding the locks and the plan read.

        ``expect_journal``: this replica's view says the stage journals writes. When it says
        not, the request is neither built nor sent to Postgres (a body of up to
        ``max_body_bytes`` for nothing); should the stage read under the fence journal it
        after all (the view was behind), the intent follows in a second statement."""
        sealed = _seal(self, dataset, request()) if expect_journal else None
        whole = lock_id(dataset, DATASET_WIDE)
        records = [] if record == DATASET_WIDE else [lock_id(dataset, record)]
        total = wait + IN_ALL

        async def take(conn: Any) -> Fenced:
            started = await _backend_start(conn)
            row = await conn.fetchrow(
                "SELECT * FROM bascule_write_begin($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
                " $11, $12, $13, $14, $15, $16, $17)",
                dataset,
                fence_id(dataset),
                whole,
                record == DATASET_WIDE,
                records,
                max(1, int(wait * 1000)),
                int(total * 1000),
                record,
                route,
                method,
                self.replica,
                started,
                sealed,
                list(JOURNALED_STAGES),
                _STAGES,
                _AUTHORITIES,
                telemetry.traceparent_now(),
                timeout=total + SILENT_AFTER,
            )
            if row is None:
                raise StoreError(f"no stage is recorded for dataset {dataset!r}")
            fenced = Fenced(row["stage"], row["version"], row["write_epoch"], row["seq"])
            if sealed is None and fenced.stage in JOURNALED_STAGES:
                session = WriteSession(self, conn, dataset)
                seq = await session.intent(
                    record=record,
                    route=route,
                    method=method,
                    authority=authority(Stage(fenced.stage)).value,
                    stage_version=fenced.version,
                    request=request(),
                    write_epoch=fenced.epoch,
                )
                fenced = Fenced(fenced.stage, fenced.version, fenced.epoch, seq)
            return fenced

        async with self._holding(dataset, wait, total, take) as held:
            yield held

    @contextlib.asynccontextmanager
    async def locked(
        self, dataset: str, records: Iterable[str], *, wait: float = 10.0
    ) -> AsyncIterator[WriteSession]:
        """Hold the locks of ``records`` (tokens; ``*`` for the whole dataset) for one write.

        A record write holds the dataset's lock shared and its records' locks exclusively, in
        sorted order (no deadlock between writes naming several records); a dataset-wide write
        holds the dataset's lock exclusively. Waiting longer than ``wait`` for one lock, or
        ``wait`` + :data:`IN_ALL` for all of them, raises :class:`RecordBusy`; a session that does
        not answer at all, :class:`StoreError`. (The write path takes its locks, plan and
        intent in one statement: :meth:`begin`.)
        """
        wanted = sorted(set(records))
        whole = lock_id(dataset, DATASET_WIDE)
        # The dataset's write fence first (shared: writes do not exclude each other; a stage
        # change that alters writes takes it exclusively), then the record locks.
        takes = [f"pg_advisory_lock_shared({fence_id(dataset)})"]
        if DATASET_WIDE in wanted:
            takes.append(f"pg_advisory_lock({whole})")
        else:
            takes.append(f"pg_advisory_lock_shared({whole})")
            takes += [f"pg_advisory_lock({lock_id(dataset, r)})" for r in wanted]
        # One round trip for the bounds and every lock, taken in this order (the ids are
        # integers computed here, never text from a request). One SELECT, not a statement per
        # lock: `lock_timeout` bounds each wait, `statement_timeout` the whole statement (it
        # applies to each statement of a message apart), so waits in turn for several locks
        # cannot add up past the client's own timeout (they did, and it then reported a busy
        # record as an unreachable store). The whole may take `IN_ALL` more than one lock, and
        # a session silent `SILENT_AFTER` past that is unreachable: 15 s in all, the client's
        # timeout before, so a partition is told as fast as it was. The
        # statement timeout is reset in the same
        # message once the locks are held (a writer pool hands sessions back unreset, and a
        # data job runs long queries on its own); should the locks fail, the message's
        # implicit transaction undoes both SETs.
        total = wait + IN_ALL
        statement = (
            f"SET lock_timeout = '{max(1, int(wait * 1000))}ms';"
            f" SET statement_timeout = '{int(total * 1000)}ms';"
            f" SELECT {', '.join(takes)}; RESET statement_timeout"
        )

        async def take(conn: Any) -> None:
            # The client's timeout outlasts the server's bound: past it the session is
            # silent (a partition), not busy. The pool's default command timeout would cut
            # the wait short, as if Postgres were unreachable.
            await conn.execute(statement, timeout=total + SILENT_AFTER)

        async with self._holding(dataset, wait, total, take) as (session, _):
            yield session

    @contextlib.asynccontextmanager
    async def _holding(
        self, dataset: str, wait: float, total: float, take: Callable[[Any], Awaitable[T]]
    ) -> AsyncIterator[tuple[WriteSession, T]]:
        """A writer session, its locks taken by ``take``; ended if anything fails before its
        outcome statement released them, its locks released otherwise."""
        async with reaching_postgres(), self._session() as conn:
            session: WriteSession | None = None
            try:
                try:
                    asked = time.monotonic()
                    taken = await take(conn)
                except (asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError) as exc:
                    # A cancel that came before the bound was someone else's (an
                    # administrator's): not a busy record. (The server's message says which,
                    # but in the server's language.)
                    if isinstance(exc, asyncpg.QueryCanceledError) and not _timed_out(asked, total):
                        raise
                    raise RecordBusy(
                        f"waited more than {wait:g} s for this record ({total:g} s in all with its"
                        " dataset's): another write to it, a create in its dataset, or a stage "
                        "switch of its dataset, held it"
                    ) from None
                session = WriteSession(self, conn, dataset)
                yield session, taken
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


_STAGES = [stage.value for stage in ORDER]
_AUTHORITIES = [authority(stage).value for stage in ORDER]
"""Each stage's authoritative side, for ``bascule_write_begin``."""
