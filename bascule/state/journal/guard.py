"""The race guard of a shadow read: may two answers asked at different times be compared?

A shadow read asks the serving side, then the shadowed side; a write landing between the two
can make them differ without any divergence. The guard reads the journal (on the database's
clock, never a replica's) and says whether the answers may be compared (``clear``), or why
not: ``raced``, ``stuck`` or ``lagging``. It never opens a body: it needs no journal key.
"""

from __future__ import annotations

from typing import Any, Literal

import asyncpg

from bascule.state.postgres import reaching_postgres

Guarded = Literal["clear", "raced", "stuck", "lagging"]
"""What the race guard says of a shadow read (:meth:`RaceGuard.race`)."""


class RaceGuard:
    def __init__(self, pool: asyncpg.Pool, timeout: float = 2.0) -> None:
        self.pool = pool
        self.timeout = timeout
        """Seconds a race guard's statement may take (a shadow read is never worth more)."""

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
            verdict: Guarded = await self.pool.fetchval(sql, *args, timeout=self.timeout)
        return verdict
