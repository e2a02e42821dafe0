"""The divergence ledger: shadow-read outcomes counted in Redis, every mismatch kept in Postgres.

Counters live in Redis time buckets shared by every replica (``{prefix}ledger:{dataset}:{bucket}``,
one hash per bucket, a field per outcome and per route and outcome). They are the fast figures
of ``bascule status`` and the gate; losing them (a Redis restart) loses counts, never evidence:
**every mismatch is also a row of ``bascule_mismatch``** — time, route template, the pointers
and kinds of the diff, its trace id — so ``bascule divergence`` and the gate can always say
what differs, where and since when. Neither holds a value: a diff has none by construction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bascule.state.postgres import reaching_postgres
from shadow.diff import Diff

log = logging.getLogger("bascule.ledger")

Outcome = Literal[
    "compared",
    "matched",
    "mismatched",
    "skipped_lagging",
    "skipped_raced",
    "skipped_large",
    "skipped_unavailable",
    "errored",
    "dropped",
]
OUTCOMES: tuple[Outcome, ...] = (
    "compared",
    "matched",
    "mismatched",
    "skipped_lagging",
    "skipped_raced",
    "skipped_large",
    "skipped_unavailable",
    "errored",
    "dropped",
)

BUCKET_SECONDS = 60
KEEP_SECONDS = 8 * 24 * 3600  # a week of gate windows, and a day to spare


@dataclass
class Ledger:
    pool: asyncpg.Pool
    redis: aioredis.Redis
    prefix: str
    bucket_seconds: int = BUCKET_SECONDS
    clock: Any = time.time

    def _key(self, dataset: str, bucket: int) -> str:
        return f"{self.prefix}ledger:{dataset}:{bucket}"

    async def count(self, dataset: str, route: str, outcome: Outcome, n: int = 1) -> None:
        """Add ``n`` to an outcome's counters; Redis away only loses the count (logged)."""
        bucket = int(self.clock()) // self.bucket_seconds * self.bucket_seconds
        key = self._key(dataset, bucket)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(key, outcome, n)
                pipe.hincrby(key, f"{route}|{outcome}", n)
                pipe.expire(key, KEEP_SECONDS)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("ledger counters not updated (%s)", type(exc).__name__)

    async def count_many(self, counts: Mapping[tuple[str, str, Outcome, int], int]) -> bool:
        """Add several ``(dataset, route, outcome, stage version) -> n`` at once: one pipeline
        (Redis's counters are per minute, whatever the version). False when Redis could not
        be reached (the caller keeps them for its next flush)."""
        bucket = int(self.clock()) // self.bucket_seconds * self.bucket_seconds
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                keys = set()
                for (dataset, route, outcome, _version), n in counts.items():
                    key = self._key(dataset, bucket)
                    keys.add(key)
                    pipe.hincrby(key, outcome, n)
                    pipe.hincrby(key, f"{route}|{outcome}", n)
                for key in keys:
                    pipe.expire(key, KEEP_SECONDS)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("ledger counters not updated (%s)", type(exc).__name__)
            return False
        return True

    async def errors(self, errors: Mapping[tuple[str, str, str, int], int]) -> None:
        """Add errored comparisons, ``(dataset, route, reason, stage version) -> n``, to this
        minute's rows in Postgres: like mismatches, they must outlive Redis (the gate wants
        none)."""
        async with reaching_postgres():
            await self.pool.executemany(
                # The database's minute, never this replica's clock (a slow one would file
                # them before the gate's window).
                "INSERT INTO bascule_shadow_error (dataset, route, reason, minute, n,"
                " stage_version) VALUES ($1, $2, $3, date_trunc('minute', now()), $4, $5)"
                " ON CONFLICT (dataset, stage_version, minute, route, reason)"
                " DO UPDATE SET n = bascule_shadow_error.n + excluded.n",
                [(d, r, reason, n, v) for (d, r, reason, v), n in errors.items()],
            )

    async def gate_counts(
        self,
        counts: Mapping[tuple[str, str, Outcome, int], int],
        *,
        writer: str = "",
        batch: int = 0,
    ) -> None:
        """Add outcomes, ``(dataset, route, outcome, stage version) -> n``, to this minute's
        rows in Postgres (the database's minute): the gate's figures, by the stage version
        reads were served under. One statement; rows in one order, so two replicas flushing at
        once cannot deadlock. ``writer``, ``batch``: the tally's batch, counted once however
        often it is sent (a flush whose commit was not acknowledged is sent again)."""
        rows = sorted((d, v, r, o, n) for (d, r, o, v), n in counts.items())
        async with reaching_postgres():
            await self.pool.execute(
                "WITH fresh AS (INSERT INTO bascule_shadow_flush (writer, batch)"
                "   VALUES ($6, $7) ON CONFLICT (writer) DO UPDATE"
                "   SET batch = excluded.batch, updated_at = now()"
                "   WHERE bascule_shadow_flush.batch < excluded.batch RETURNING 1)"
                " INSERT INTO bascule_shadow_count (dataset, stage_version, route, outcome,"
                " minute, n) SELECT c.d, c.v, c.r, c.o, date_trunc('minute', now()), c.n"
                " FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[])"
                "   WITH ORDINALITY AS c(d, v, r, o, n, i) WHERE EXISTS (SELECT 1 FROM fresh)"
                " ORDER BY c.i"
                " ON CONFLICT (dataset, stage_version, minute, route, outcome)"
                " DO UPDATE SET n = bascule_shadow_count.n + excluded.n",
                [row[0] for row in rows],
                [row[1] for row in rows],
                [row[2] for row in rows],
                [row[3] for row in rows],
                [row[4] for row in rows],
                writer,
                batch,
            )

    async def mismatch(
        self,
        dataset: str,
        route: str,
        diff: Diff,
        trace_id: str | None = None,
        *,
        count: bool = True,
        at: float | None = None,
        version: int = 0,
    ) -> None:
        """Keep a mismatch in Postgres (the evidence), then count it (unless the caller
        counts it itself, as the dispatcher does in batches). ``at``: when it was found, in
        epoch seconds on this database's clock (a row written late, after a Postgres outage,
        still says when the divergence was seen); None: now. ``version``: the version of the
        dataset's stage the read was served under."""
        rows = [[d.part, d.pointer, d.kind] for d in diff.differences]
        async with reaching_postgres():
            await self.pool.execute(
                "INSERT INTO bascule_mismatch"
                " (at, dataset, route, differences, truncated, trace_id, stage_version)"
                " VALUES (coalesce(to_timestamp($6::float8), now()), $1, $2, $3::jsonb, $4, $5,"
                " $7)",
                dataset,
                route,
                json.dumps(rows),
                diff.truncated,
                trace_id,
                at,
                version,
            )
        if count:
            await self.count(dataset, route, "mismatched")

    async def counts(self, dataset: str, since: float) -> dict[str, int]:
        """Per outcome, over the buckets from ``since`` (epoch seconds) to now; empty figures
        when Redis is away (the mismatches themselves are in Postgres)."""
        last = int(self.clock()) // self.bucket_seconds * self.bucket_seconds
        # Buckets older than KEEP_SECONDS have expired: never ask for them.
        since = max(since, last - KEEP_SECONDS)
        first = int(since) // self.bucket_seconds * self.bucket_seconds
        totals: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        keys = [self._key(dataset, b) for b in range(first, last + 1, self.bucket_seconds)]
        with contextlib.suppress(RedisError, OSError):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, list(OUTCOMES))
                for values in await pipe.execute():
                    for outcome, value in zip(OUTCOMES, values, strict=True):
                        totals[outcome] += int(value or 0)
        return totals


async def counts_under(
    pool: asyncpg.Pool, versions: Mapping[str, int]
) -> dict[str, dict[str, int]]:
    """Per dataset, the outcomes of the shadow reads served under the given stage version
    (every outcome named, zero where none), from Postgres: the gate's figures."""
    async with reaching_postgres():
        rows = await pool.fetch(
            "SELECT c.dataset, c.outcome, sum(c.n)::bigint AS n FROM bascule_shadow_count c"
            " JOIN unnest($1::text[], $2::bigint[]) AS v(dataset, version)"
            "   ON c.dataset = v.dataset AND c.stage_version = v.version"
            " GROUP BY 1, 2",
            list(versions),
            list(versions.values()),
        )
    found: dict[str, dict[str, int]] = {name: dict.fromkeys(OUTCOMES, 0) for name in versions}
    for r in rows:
        if r["outcome"] in found[r["dataset"]]:
            found[r["dataset"]][r["outcome"]] = int(r["n"])
    return found


async def divergence(
    pool: asyncpg.Pool, dataset: str, since: datetime | None = None, examples: int = 3
) -> list[dict[str, Any]]:
    """Recent mismatches of ``dataset`` grouped by where they differ: part, pointer and kind,
    how many, first and last seen, and a few trace ids to open."""
    async with reaching_postgres():
        rows = await pool.fetch(
            "SELECT d ->> 0 AS part, d ->> 1 AS pointer, d ->> 2 AS kind, count(*) AS n,"
            " min(m.at) AS first_seen, max(m.at) AS last_seen,"
            " (array_agg(m.trace_id ORDER BY m.at DESC)"
            "   FILTER (WHERE m.trace_id IS NOT NULL))[1:$3] AS traces,"
            " array_agg(DISTINCT m.route) AS routes"
            " FROM bascule_mismatch m, jsonb_array_elements(m.differences) AS d"
            " WHERE m.dataset = $1 AND ($2::timestamptz IS NULL OR m.at >= $2)"
            " GROUP BY 1, 2, 3 ORDER BY n DESC, pointer",
            dataset,
            since,
            examples,
        )
    return [
        {
            "part": r["part"],
            "pointer": r["pointer"],
            "kind": r["kind"],
            "count": r["n"],
            "first_seen": r["first_seen"].isoformat(),
            "last_seen": r["last_seen"].isoformat(),
            "trace_ids": list(r["traces"] or []),
            "routes": sorted(r["routes"]),
        }
        for r in rows
    ]


async def errored(
    pool: asyncpg.Pool, dataset: str, since: datetime | None = None
) -> list[dict[str, Any]]:
    """Comparisons of ``dataset`` that could not be made, by route and reason: how many,
    first and last minute seen."""
    async with reaching_postgres():
        rows = await pool.fetch(
            "SELECT route, reason, sum(n)::bigint AS n, min(minute) AS first_seen,"
            " max(minute) AS last_seen FROM bascule_shadow_error"
            " WHERE dataset = $1"
            " AND ($2::timestamptz IS NULL OR minute >= date_trunc('minute', $2))"
            " GROUP BY route, reason ORDER BY n DESC, route, reason",
            dataset,
            since,
        )
    return [
        {
            "route": r["route"],
            "reason": r["reason"],
            "count": r["n"],
            "first_seen": r["first_seen"].isoformat(),
            "last_seen": r["last_seen"].isoformat(),
        }
        for r in rows
    ]


async def per_minute(
    pool: asyncpg.Pool, datasets: list[str], minutes: int = 60
) -> dict[str, list[dict[str, Any]]]:
    """Per dataset, the last ``minutes`` minutes on the database's clock, oldest first, each
    with its comparisons and mismatches (whatever the stage version): the on-call page's chart.
    Every minute is listed, zero where nothing was compared."""
    async with reaching_postgres():
        rows = await pool.fetch(
            "WITH span AS (SELECT generate_series(date_trunc('minute', now())"
            "   - make_interval(mins => $2 - 1), date_trunc('minute', now()),"
            "   interval '1 minute') AS minute)"
            " SELECT d.dataset, s.minute,"
            "  coalesce(sum(c.n) FILTER (WHERE c.outcome = 'compared'), 0)::bigint AS compared,"
            "  coalesce(sum(c.n) FILTER (WHERE c.outcome = 'mismatched'), 0)::bigint"
            "   AS mismatched"
            " FROM unnest($1::text[]) AS d(dataset) CROSS JOIN span s"
            " LEFT JOIN bascule_shadow_count c ON c.dataset = d.dataset AND c.minute = s.minute"
            "  AND c.outcome IN ('compared', 'mismatched')"
            " GROUP BY 1, 2 ORDER BY 1, 2",
            datasets,
            minutes,
        )
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in datasets}
    for r in rows:
        found[r["dataset"]].append(
            {
                "minute": r["minute"].isoformat(),
                "compared": int(r["compared"]),
                "mismatched": int(r["mismatched"]),
            }
        )
    return found
