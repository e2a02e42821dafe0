"""Verification and backfill runs in the state database: who runs, their checkpoints, results.

One data job per dataset at a time: a verification or a backfill holds the dataset's *data
lock*, a session advisory lock on its own state-database session, for its whole life (two
verifications of one dataset, or a verification during a backfill, would each see the other's
writes as divergence). A process that dies loses the lock with its session; its run, left
``running``, is marked ``interrupted`` by the next job to take the lock.

Checkpoints hold keys (resume positions, thresholds, what differed) and keyed hash sums: they
are sealed with the journal key like the journal's bodies. Figures hold counts, rates and
tokens only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

import asyncpg

from bascule.errors import Refused
from bascule.sealing import Sealer
from bascule.state.postgres import reaching_postgres
from cutover.findings import describe

Kind = Literal["verify", "backfill"]
_TABLES: dict[Kind, tuple[str, str]] = {
    "verify": ("bascule_verify_run", "bascule_verify_checkpoint"),
    "backfill": ("bascule_backfill_run", "bascule_backfill_checkpoint"),
}


def data_lock_id(dataset: str) -> int:
    """The advisory-lock id of a dataset's data jobs (verification, backfill)."""
    digest = hashlib.blake2b(f"data\x00{dataset}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True)
class PastRun:
    id: int
    status: str
    started_at: datetime
    since: datetime
    """``swept_since`` of a verification, ``writes_since`` of a backfill."""
    stage_version: int
    mode: str | None
    authority: str | None


class Stoppable(Protocol):
    """A run's report, as :meth:`Runs.stopping` records it when the run stops early."""

    status: str
    seconds: float

    def figures(self) -> dict[str, Any]: ...


class Runs:
    """A data job's session on the state database: its data lock, its run row, checkpoints.

    Calls are serialized (one session; both sides' scans checkpoint through it)."""

    def __init__(self, conn: asyncpg.Connection, sealer: Sealer, dataset: str) -> None:
        self.conn = conn
        self.sealer = sealer
        self.dataset = dataset
        self._one = asyncio.Lock()
        self.locked = False

    async def lock(self) -> None:
        """Take the dataset's data lock, or Refused naming the job that holds it."""
        async with self._one, reaching_postgres():
            got = await self.conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", data_lock_id(self.dataset)
            )
            if not got:
                rows = await self.conn.fetch(
                    "SELECT 'backfill' AS kind, id, started_at, actor FROM bascule_backfill_run"
                    " WHERE dataset = $1 AND status = 'running'"
                    " UNION ALL SELECT 'verification', id, started_at, actor"
                    " FROM bascule_verify_run WHERE dataset = $1 AND status = 'running'"
                    " ORDER BY started_at DESC LIMIT 1",
                    self.dataset,
                )
                what = (
                    f"a {rows[0]['kind']} of {self.dataset} is running (run {rows[0]['id']}, "
                    f"started {rows[0]['started_at']:%Y-%m-%d %H:%M:%SZ} by {rows[0]['actor']})"
                    if rows
                    else f"another verification or backfill of {self.dataset} is starting"
                )
                raise Refused(
                    f"{self.dataset}: {what}; one data job runs per dataset at a time: "
                    "wait for it to end (or stop it: an interrupted run can be resumed)"
                )
            self.locked = True
            # Runs left 'running' by a process that died: the lock says nobody runs them.
            for run_table, _ in _TABLES.values():
                await self.conn.execute(
                    f"UPDATE {run_table} SET status = 'interrupted', finished_at = now(),"
                    " error = coalesce(error, 'its process ended without finishing')"
                    " WHERE dataset = $1 AND status = 'running'",
                    self.dataset,
                )

    async def unlock(self) -> None:
        if self.locked:
            async with self._one, reaching_postgres():
                await self.conn.execute("SELECT pg_advisory_unlock($1)", data_lock_id(self.dataset))
            self.locked = False

    async def resumed(self, kind: Kind) -> PastRun:
        """The run ``--resume`` continues (:meth:`resumable`); Refused when there is none."""
        found = await self.resumable(kind)
        if found is None:
            what = "verification" if kind == "verify" else "backfill"
            raise Refused(
                f"{self.dataset}: no interrupted {what} to resume (the latest finished); run it "
                "without --resume"
            )
        return found

    async def resumable(self, kind: Kind) -> PastRun | None:
        """The latest run of ``kind`` that was interrupted or failed, unless a later one
        finished: the one ``--resume`` continues."""
        run_table, _ = _TABLES[kind]
        since = "swept_since" if kind == "verify" else "writes_since"
        extra = "mode, authority" if kind == "verify" else "NULL AS mode, NULL AS authority"
        async with self._one, reaching_postgres():
            row = await self.conn.fetchrow(
                f"SELECT id, status, started_at, {since} AS since, stage_version, {extra}"
                f" FROM {run_table} WHERE dataset = $1 ORDER BY id DESC LIMIT 1",
                self.dataset,
            )
        if row is None or row["status"] not in ("interrupted", "failed"):
            return None
        return PastRun(**dict(row))

    async def start_verify(
        self,
        *,
        mode: str,
        verified: str,
        authority: str,
        stage: str,
        stage_version: int,
        actor: str,
        resumed: PastRun | None = None,
        backfill_run: int | None = None,
    ) -> tuple[int, datetime]:
        """A new verification run; (its id, since when the rows it relies on were read)."""
        async with self._one, reaching_postgres(), self.conn.transaction():
            row = await self.conn.fetchrow(
                "INSERT INTO bascule_verify_run (dataset, mode, verified, authority, stage,"
                " stage_version, actor, resumed_from, backfill_run, swept_since)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, coalesce($10, now()))"
                " RETURNING id, swept_since",
                self.dataset,
                mode,
                verified,
                authority,
                stage,
                stage_version,
                actor,
                resumed.id if resumed else None,
                backfill_run,
                resumed.since if resumed else None,
            )
            assert row is not None
            if resumed is not None:
                await self._copy_checkpoints("verify", resumed.id, row["id"])
        return row["id"], row["swept_since"]

    async def start_backfill(
        self, *, stage_version: int, actor: str, resumed: PastRun | None = None
    ) -> tuple[int, datetime]:
        """A new backfill run; (its id, since when journaled writes are settled at its end)."""
        async with self._one, reaching_postgres(), self.conn.transaction():
            row = await self.conn.fetchrow(
                "INSERT INTO bascule_backfill_run (dataset, stage_version, actor, resumed_from,"
                " writes_since) VALUES ($1, $2, $3, $4, coalesce($5, now()))"
                " RETURNING id, writes_since",
                self.dataset,
                stage_version,
                actor,
                resumed.id if resumed else None,
                resumed.since if resumed else None,
            )
            assert row is not None
            if resumed is not None:
                await self._copy_checkpoints("backfill", resumed.id, row["id"])
        return row["id"], row["writes_since"]

    async def _copy_checkpoints(self, kind: Kind, old: int, new: int) -> None:
        _, checkpoints = _TABLES[kind]
        columns = "tbl, done, position, " + ("rows, bytes" if kind == "backfill" else "figures")
        await self.conn.execute(
            f"INSERT INTO {checkpoints} (run_id, {columns}) SELECT $2, {columns}"
            f" FROM {checkpoints} WHERE run_id = $1",
            old,
            new,
        )

    async def checkpoint(
        self,
        kind: Kind,
        run: int,
        table: str,
        position: Mapping[str, Any] | None,
        *,
        done: bool = False,
        figures: Mapping[str, Any] | None = None,
        rows: int = 0,
        nbytes: int = 0,
    ) -> None:
        """Save where ``run`` stands on ``table`` (``position`` is sealed)."""
        sealed = (
            None
            if position is None
            else self.sealer.seal(
                json.dumps(position, separators=(",", ":")).encode(),
                dataset=self.dataset,
                field=f"{kind}-checkpoint",
            )
        )
        async with self._one, reaching_postgres():
            if kind == "verify":
                await self.conn.execute(
                    "INSERT INTO bascule_verify_checkpoint (run_id, tbl, done, position, figures)"
                    " VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT (run_id, tbl) DO UPDATE"
                    " SET done = excluded.done, position = excluded.position,"
                    " figures = excluded.figures, updated_at = now()",
                    run,
                    table,
                    done,
                    sealed,
                    json.dumps(dict(figures or {})),
                )
            else:
                await self.conn.execute(
                    "INSERT INTO bascule_backfill_checkpoint (run_id, tbl, done, position, rows,"
                    " bytes) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (run_id, tbl) DO UPDATE"
                    " SET done = excluded.done, position = excluded.position,"
                    " rows = excluded.rows, bytes = excluded.bytes, updated_at = now()",
                    run,
                    table,
                    done,
                    sealed,
                    rows,
                    nbytes,
                )

    async def checkpoints(self, kind: Kind, run: int) -> dict[str, dict[str, Any]]:
        """Each table's checkpoint of ``run``: ``done``, ``position`` (opened), and for a
        backfill ``rows`` and ``bytes``."""
        _, checkpoints = _TABLES[kind]
        extra = ", rows, bytes" if kind == "backfill" else ", figures"
        async with self._one, reaching_postgres():
            rows = await self.conn.fetch(
                f"SELECT tbl, done, position{extra} FROM {checkpoints} WHERE run_id = $1", run
            )
        found: dict[str, dict[str, Any]] = {}
        for r in rows:
            item = dict(r)
            if r["position"] is not None:
                item["position"] = json.loads(
                    self.sealer.open(
                        r["position"], dataset=self.dataset, field=f"{kind}-checkpoint"
                    )
                )
            if "figures" in item:
                item["figures"] = json.loads(item["figures"])
            found[r["tbl"]] = item
        return found

    async def finish(
        self,
        kind: Kind,
        run: int,
        status: str,
        figures: Mapping[str, Any],
        *,
        error: str | None = None,
        verify_run: int | None = None,
    ) -> None:
        run_table, _ = _TABLES[kind]
        async with self._one, reaching_postgres():
            await self.conn.execute(
                f"UPDATE {run_table} SET status = $2, finished_at = now(), figures = $3::jsonb,"
                " error = $4"
                + (", verify_run = $5" if kind == "backfill" else "")
                + " WHERE id = $1",
                run,
                status,
                json.dumps(dict(figures)),
                error,
                *([verify_run] if kind == "backfill" else []),
            )

    @contextlib.asynccontextmanager
    async def stopping(self, kind: Kind, run: int, report: Stoppable) -> AsyncIterator[None]:
        """Around a run's work: should it stop on an error or a cancellation, its row says
        so (``interrupted`` or ``failed``, with what stopped it) before the error goes on."""
        started = time.monotonic()
        try:
            yield
        except BaseException as exc:
            interrupted = isinstance(exc, asyncio.CancelledError | KeyboardInterrupt)
            report.status = "interrupted" if interrupted else "failed"
            report.seconds = time.monotonic() - started
            with contextlib.suppress(Exception):
                await self.finish(kind, run, report.status, report.figures(), error=describe(exc))
            raise

    async def now(self) -> datetime:
        """The state database's clock."""
        async with self._one, reaching_postgres():
            at: datetime = await self.conn.fetchval("SELECT now()")
        return at


async def latest_clean(pool: asyncpg.Pool, dataset: str) -> dict[str, Any] | None:
    """The gate's question: the latest clean verification of ``dataset``, and since when the
    rows it compared were read (``swept_since``; its own start unless it resumed a run)."""
    async with reaching_postgres():
        row = await pool.fetchrow(
            "SELECT run_id, mode, verified, swept_since, started_at, finished_at"
            " FROM bascule_verify_latest_clean WHERE dataset = $1",
            dataset,
        )
    return None if row is None else dict(row)
