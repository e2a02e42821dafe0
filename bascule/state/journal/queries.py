"""What SREs and the authority switch ask of the journal: backlogs, listings, retry and skip,
orphans; and the purge of settled entries past their retention.

None of these opens a body: entries are listed by their metadata only, with record tokens.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from bascule.stages import Side
from bascule.state import audit
from bascule.state.journal.entries import ORPHANED, IllegalTransition
from bascule.state.postgres import Reader, reaching_postgres
from bascule.state.stage_store import open_gap


async def backlog(pool: Reader, dataset: str | None = None) -> dict[str, dict[str, Any]]:
    """Per dataset (``dataset``'s only, if given): backlog (intent + pending), oldest pending
    age, in doubt, dead."""
    async with reaching_postgres():
        rows = await pool.fetch(
            "SELECT dataset,"
            " count(*) FILTER (WHERE state IN ('intent', 'pending')) AS backlog,"
            " extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'pending'))"
            "   AS oldest_pending_seconds,"
            " count(*) FILTER (WHERE state = 'in_doubt') AS in_doubt,"
            " count(*) FILTER (WHERE state = 'dead') AS dead"
            " FROM bascule_journal_open($1::text) GROUP BY dataset",
            dataset,
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


async def retry(
    pool: asyncpg.Pool,
    seq: int | None,
    *,
    all_dead: bool = False,
    actor: str,
    reason: str,
    details: dict[str, str] | None = None,
) -> int:
    """Send dead entries (one, or all) back to the replayer, audited (a row per dataset, with
    the entries) in the same transaction; return how many."""
    async with reaching_postgres(), pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "UPDATE bascule_journal SET state = 'pending', attempts = 0, next_attempt_at = now()"
            " WHERE state = 'dead' AND ($1::bigint IS NULL OR seq = $1) AND ($2 OR seq = $1)"
            " RETURNING seq, dataset",
            seq,
            all_dead,
        )
        retried: dict[str, list[int]] = {}
        for row in rows:
            retried.setdefault(row["dataset"], []).append(row["seq"])
        for dataset, seqs in sorted(retried.items()):
            await audit.record(
                conn,
                dataset,
                "journal-retry",
                actor=actor,
                reason=reason,
                details={**(details or {}), "seqs": sorted(seqs)},
            )
    return len(rows)


async def entry_of(pool: Reader, seq: int) -> dict[str, Any] | None:
    """One entry's metadata (never its body), or None."""
    async with reaching_postgres():
        row = await pool.fetchrow(
            "SELECT seq, dataset, record, route, method, authority, state, last_error"
            " FROM bascule_journal WHERE seq = $1",
            seq,
        )
    return None if row is None else dict(row)


async def resolve(
    pool: asyncpg.Pool,
    seq: int,
    *,
    applied: bool,
    actor: str,
    reason: str,
    record: str | None = None,
    named: bytes | None = None,
    details: dict[str, str] | None = None,
) -> str:
    """An SRE's word on an entry in doubt, audited in the same transaction; its dataset.

    Not applied: the authoritative side never applied it, so there is nothing to replay (it
    becomes *rejected*, and holds nothing back any more). Applied, for a create whose record is
    now known (``record``: its token; ``named``: the sealed answer naming its id, for the
    resolver): the entry is named after that record and stays in doubt until the resolver has
    read the record back from the authoritative side and queued its current state."""
    async with reaching_postgres(), pool.acquire() as conn, conn.transaction():
        if applied:
            row = await conn.fetchrow(
                "UPDATE bascule_journal SET record = $2, answer = $3, next_attempt_at = now(),"
                " last_error = 'an SRE named the record it made: it is read back'"
                " WHERE seq = $1 AND state = 'in_doubt' AND record = '*'"
                " RETURNING dataset, state",
                seq,
                record,
                named,
            )
        else:
            row = await conn.fetchrow(
                "UPDATE bascule_journal SET state = 'rejected', decided_at = now(),"
                " last_error = 'an SRE said it was not applied'"
                " WHERE seq = $1 AND state = 'in_doubt' RETURNING dataset, 'in_doubt' AS state",
                seq,
            )
        if row is None:
            raise IllegalTransition(f"journal entry {seq} does not exist or is not in doubt")
        await audit.record(
            conn,
            row["dataset"],
            "journal-resolve",
            actor=actor,
            reason=reason,
            details={
                **(details or {}),
                "seq": seq,
                "was": "in_doubt",
                "as": "applied" if applied else "not-applied",
            },
        )
        return str(row["dataset"])


async def skip(
    pool: asyncpg.Pool,
    seq: int,
    *,
    actor: str,
    reason: str,
    details: dict[str, str] | None = None,
) -> str:
    """Give up replaying an entry, audited in the same transaction; return its dataset.

    The side the entry was to be replayed to may now miss that write (an in-doubt one may or
    may not have reached its authority: the other side is the one that may lack it): its gap
    opens in the same transaction, so no move exposes it until a verification closes it."""
    async with reaching_postgres(), pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "WITH was AS (SELECT seq, state FROM bascule_journal WHERE seq = $1 FOR UPDATE)"
            " UPDATE bascule_journal j SET state = 'skipped', applied_at = now() FROM was"
            " WHERE j.seq = was.seq AND was.state IN ('pending', 'in_doubt', 'dead')"
            " RETURNING j.dataset, was.state, j.authority",
            seq,
        )
        if row is None:
            raise IllegalTransition(
                f"journal entry {seq} does not exist or is not pending, in doubt or dead"
            )
        missed = Side.TARGET if row["authority"] == Side.SOURCE.value else Side.SOURCE
        opened = await open_gap(conn, row["dataset"], missed)
        await audit.record(
            conn,
            row["dataset"],
            "journal-skip",
            actor=actor,
            reason=reason,
            details={
                **(details or {}),
                "seq": seq,
                "was": row["state"],
                "gap": missed.value,
                "gap_opened": opened,
            },
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


async def orphan_count(pool: Reader, dataset: str) -> int:
    """How many of ``dataset``'s writes were left by a writer whose session has ended before
    recording their outcome (whatever their age: the resolver settles them after a grace)."""
    async with reaching_postgres():
        found: int = await pool.fetchval(
            f"SELECT count(*) FROM bascule_journal_unsettled($1) j WHERE {ORPHANED}",
            dataset,
        )
    return found
