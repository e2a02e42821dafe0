"""The journal's core: its pools and sealer, and how an entry moves from state to state.

Every transition is one conditional UPDATE that names the states it may come from
(:data:`~bascule.state.journal.entries.NEXT`); a transition the entry's state does not allow
raises :class:`~bascule.state.journal.entries.IllegalTransition` and changes nothing. Bodies are
sealed (encrypted) at rest and opened here only for the replayer and the resolver.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg

from bascule.sealing import Sealer
from bascule.state.journal.entries import NEXT, Entry, IllegalTransition, State
from bascule.state.postgres import reaching_postgres


class JournalCore:
    """The journal's shared parts: its pools, the sealer of its bodies, and entry outcomes."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        sealer: Sealer,
        replica: str,
        sessions: asyncpg.Pool | None = None,
        session_wait: float = 10.0,
    ) -> None:
        self.pool = pool
        """For reading and settling entries (the replayer, the resolver, status)."""
        self.sessions = sessions or pool
        """For writes: each holds one session, with its record lock, for its whole life."""
        self.session_wait = session_wait
        """Seconds a write waits for one of those sessions (all busy, or the server refusing
        new ones) before it is refused, ``journal_unavailable``, rather than hang."""
        self.sealer = sealer
        self.replica = replica
        self._woken: set[str] = set()
        """Datasets this replica moved entries of to *pending* since :meth:`take_woken`."""
        self._wake = asyncio.Event()
        """Set while ``_woken`` holds any."""

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
        record: str | None = None,
    ) -> None:
        """Record an entry's outcome. With ``stage_version``, only if the entry was written
        under that stage version (the epoch check of the outcome transaction). ``record``: the
        record the entry turned out to write (a create, once the record it made is known)."""
        sealed = self.sealer.seal(answer, dataset=dataset, field="answer") if answer else None
        await self._move(
            seq,
            state,
            status=status,
            answer=sealed,
            stage_version=stage_version,
            conn=conn,
            error=error,
            record=record,
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
        record: str | None = None,
        request: bytes | None = None,
    ) -> None:
        """Move one entry to ``state`` if its state allows it. ``release``: the writer's own
        outcome statement, which also releases its session's locks and commits without
        waiting for the WAL flush (see :meth:`WriteSession.decide`). ``record``: the record
        the entry turned out to write (a create, once its answer names the new record).
        ``request``: the sealed request with its body (the intent's has none)."""
        allowed = [s for s, nexts in NEXT.items() if state in nexts]
        update = (
            "UPDATE bascule_journal SET state = $2,"
            " status = coalesce($3, status), answer = coalesce($4, answer),"
            " last_error = coalesce($5, last_error), record = coalesce($9, record),"
            " request = coalesce($10, request),"
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
                record,
                request,
            )
        if done is None:
            raise IllegalTransition(f"journal entry {seq} cannot move to {state!r} from its state")
        if state == "pending":
            self.wake(done)

    async def name_record(self, seq: int, record: str, answer: bytes, *, dataset: str) -> bool:
        """Name a dataset-wide entry in doubt after the record it turned out to write (a
        create whose record is now known), leaving it in doubt; ``answer``: what says which
        record (sealed here), kept for whoever settles it. False if it is no longer in doubt,
        or is another record's."""
        sealed = self.sealer.seal(answer, dataset=dataset, field="answer")
        async with reaching_postgres():
            named = await self.pool.fetchval(
                "UPDATE bascule_journal SET record = $2, answer = $3 WHERE seq = $1"
                " AND state = 'in_doubt' AND record IN ('*', $2) RETURNING seq",
                seq,
                record,
                sealed,
            )
        return named is not None

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
