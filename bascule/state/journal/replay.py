"""What may be replayed, in what order: the replayer's and the resolver's view of the journal.

An entry is replayed only after every earlier open entry of its record (and of its dataset,
when either is dataset-wide) has settled. That rule is evaluated on each entry's own state,
never on a high-water mark: a lower ``seq`` can commit after a higher one is visible.

One exception: a create left in doubt (its answer lost, so the record it made is unknown)
holds back only later dataset-wide entries, not later writes naming their record. Those may
name the record it made (a researcher who found it): replayed before it, they are never
overwritten by it, since a create is settled by reading its record's *current* state back from
the authority (``proxy/resolver.py``), which holds them already.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import asyncpg

from bascule.state.journal.core import JournalCore
from bascule.state.journal.entries import COLUMNS, J_COLUMNS, ORPHANED, Entry, entry
from bascule.state.postgres import reaching_postgres


class ReplaySelection(JournalCore):
    """Pending entries in replay order, the orphans, and marking entries applied."""

    async def replayable(
        self, dataset: str, limit: int = 100, run: int = 1, creates: Collection[str] = ()
    ) -> list[Entry]:
        """Pending entries whose every earlier open entry of the same record — or of the whole
        dataset, when either is dataset-wide — has settled or comes before it in this answer;
        in order. ``run``: how many of one record's consecutive pending entries may come
        (the replayer applies them one after the other), so a busy record is not drained one
        entry per round. ``creates``: the routes that create a record (``"METHOD template"``):
        one of those left in doubt holds back dataset-wide entries only (see the module)."""
        return [entry(r) for r in await self._replayable(dataset, limit, run, "", creates)]

    async def wave(
        self, dataset: str, limit: int = 100, run: int = 1, creates: Collection[str] = ()
    ) -> tuple[list[Entry], dict[int, tuple[dict[str, Any], bytes | None]]]:
        """:meth:`replayable` and the opened request and answer of each entry, in one query
        (the replayer's round)."""
        rows = await self._replayable(dataset, limit, run, ", j.request, j.answer", creates)
        entries = [entry(r) for r in rows]
        return entries, {
            entry.seq: self._opened(dataset, r["request"], r["answer"])
            for entry, r in zip(entries, rows, strict=True)
        }

    async def _replayable(
        self, dataset: str, limit: int, run: int, extra: str, creates: Collection[str]
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
                "WITH open AS MATERIALIZED (SELECT seq, record, state, next_attempt_at,"
                # A create in doubt: later record entries do not wait for it (see the module).
                "   record = '*' AND state = 'in_doubt'"
                "     AND method || ' ' || route = ANY($4::text[]) AS loose"
                "   FROM bascule_journal_open($1)),"
                " chains AS (SELECT seq, record, row_number() OVER w AS pos,"
                "   count(*) FILTER (WHERE state <> 'pending' OR next_attempt_at > now())"
                "     OVER w AS blocked"
                "   FROM open WINDOW w AS (PARTITION BY record ORDER BY seq)),"
                " wave AS (SELECT seq FROM chains c WHERE c.blocked = 0 AND c.pos <= $3"
                "   AND CASE WHEN c.record = '*' THEN c.seq = (SELECT min(seq) FROM open)"
                "     ELSE c.seq < coalesce((SELECT min(seq) FROM open"
                "       WHERE record = '*' AND NOT loose),"
                "       9223372036854775807) END"
                "   ORDER BY seq LIMIT $2)"
                f" SELECT {J_COLUMNS}{extra} FROM bascule_journal j JOIN wave USING (seq)"
                " ORDER BY j.seq",
                dataset,
                limit,
                run,
                list(creates),
            )
        return rows

    async def in_doubt(self, dataset: str) -> list[Entry]:
        """The entries of ``dataset`` in doubt, in order."""
        async with reaching_postgres():
            rows = await self.pool.fetch(
                f"SELECT {COLUMNS} FROM bascule_journal_unsettled($1)"
                " WHERE state = 'in_doubt' ORDER BY seq",
                dataset,
            )
        return [entry(r) for r in rows]

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

    async def orphans(self, dataset: str, older_than: float = 0.0) -> list[Entry]:
        """Entries of ``dataset`` still at ``intent`` whose writer's session has ended: its lock
        is gone with it, so nobody else will ever record their outcome. ``older_than``: only
        those whose intent is at least that many seconds old, by the database's clock (no
        skew)."""
        async with reaching_postgres():
            rows = await self.pool.fetch(
                f"SELECT {COLUMNS} FROM bascule_journal_unsettled($1) j WHERE {ORPHANED}"
                " AND j.created_at < now() - make_interval(secs => $2)"
                " ORDER BY j.seq",
                dataset,
                older_than,
            )
        return [entry(r) for r in rows]
