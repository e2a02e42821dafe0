"""The stage store: each dataset's stage as durable truth in Postgres, with its audit trail.

A stage changes only by compare-and-set on its version, in the same transaction as the audit
row that says who, when, from, to and why: there is no change without its audit, and no audit
of a change that did not happen.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from bascule import schema
from bascule.errors import BasculeError, StaleVersion, StoreError, UnknownDataset
from cutover.stages import Stage


@dataclass(frozen=True, slots=True)
class StageRow:
    dataset: str
    stage: Stage
    version: int
    updated_at: datetime
    updated_by: str
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "stage": self.stage.value,
            "version": self.version,
            "updated_at": self.updated_at.isoformat(),
            "updated_by": self.updated_by,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    at: datetime
    dataset: str
    action: str
    actor: str
    from_stage: str | None
    to_stage: str | None
    from_version: int | None
    to_version: int | None
    reason: str
    forced: bool
    details: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "dataset": self.dataset,
            "action": self.action,
            "actor": self.actor,
            "from_stage": self.from_stage,
            "to_stage": self.to_stage,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "reason": self.reason,
            "forced": self.forced,
            "details": self.details,
        }


_STAGE_COLUMNS = "dataset, stage, version, updated_at, updated_by, reason"


def _stage_row(rec: asyncpg.Record) -> StageRow:
    return StageRow(
        rec["dataset"],
        Stage(rec["stage"]),
        rec["version"],
        rec["updated_at"],
        rec["updated_by"],
        rec["reason"],
    )


def _audit_row(rec: asyncpg.Record) -> AuditRow:
    return AuditRow(**{**dict(rec), "details": json.loads(rec["details"])})


UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    # A pooled connection caught mid-operation by a server restart can be left in a state
    # asyncpg reports this way; to the caller it is the same: the store is not usable now.
    asyncpg.InternalClientError,
)


@contextlib.asynccontextmanager
async def reaching_postgres() -> AsyncIterator[None]:
    """Turn the many ways a connection fails into one :class:`StoreError`."""
    try:
        yield
    except BasculeError:
        raise  # ours already say what is wrong (SchemaError is a ConnectionError too)
    except UNREACHABLE as exc:
        raise StoreError(f"the state Postgres is unreachable ({type(exc).__name__})") from exc
    except asyncpg.PostgresError as exc:
        # Too many clients, a cancelled statement, a crash restart, a bad password: to the
        # caller these all mean the state store cannot be used right now.
        raise StoreError(
            f"the state Postgres refused the operation ({type(exc).__name__})"
        ) from exc


class StageStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def all(self) -> dict[str, StageRow]:
        async with reaching_postgres():
            rows = await self.pool.fetch(f"SELECT {_STAGE_COLUMNS} FROM bascule_stage")
        return {r["dataset"]: _stage_row(r) for r in rows}

    async def get(self, dataset: str) -> StageRow:
        async with reaching_postgres():
            rec = await self.pool.fetchrow(
                f"SELECT {_STAGE_COLUMNS} FROM bascule_stage WHERE dataset = $1", dataset
            )
            if rec is None:
                raise UnknownDataset(dataset, await self.names())
        return _stage_row(rec)

    async def names(self) -> list[str]:
        async with reaching_postgres():
            rows = await self.pool.fetch("SELECT dataset FROM bascule_stage")
        return [r["dataset"] for r in rows]

    async def register(self, datasets: Iterable[str], actor: str) -> list[str]:
        """Give each dataset that has no stage yet the stage ``source``; return those added."""
        added = []
        async with reaching_postgres(), self.pool.acquire() as conn, conn.transaction():
            for name in sorted(set(datasets)):
                rec = await conn.fetchrow(
                    "INSERT INTO bascule_stage (dataset, stage, version, updated_by, reason)"
                    " VALUES ($1, 'source', 1, $2, 'registered') ON CONFLICT DO NOTHING"
                    " RETURNING dataset",
                    name,
                    actor,
                )
                if rec is not None:
                    await _audit(
                        conn,
                        name,
                        "register",
                        actor,
                        None,
                        "source",
                        None,
                        1,
                        "registered from the configuration",
                        False,
                        {},
                    )
                    added.append(name)
        return added

    async def change(
        self,
        dataset: str,
        expected_version: int,
        to: Stage,
        *,
        actor: str,
        reason: str,
        action: str = "stage",
        forced: bool = False,
        details: Mapping[str, Any] | None = None,
    ) -> StageRow:
        """Compare-and-set the stage; append its audit row in the same transaction."""
        async with reaching_postgres(), self.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow(
                f"SELECT {_STAGE_COLUMNS} FROM bascule_stage WHERE dataset = $1 FOR UPDATE",
                dataset,
            )
            if before is None:
                raise UnknownDataset(
                    dataset,
                    [r["dataset"] for r in await conn.fetch("SELECT dataset FROM bascule_stage")],
                )
            if before["version"] != expected_version:
                raise StaleVersion(dataset, expected_version, before["version"])
            rec = await conn.fetchrow(
                "UPDATE bascule_stage SET stage = $3, version = version + 1, updated_at = now(),"
                " updated_by = $4, reason = $5 WHERE dataset = $1 AND version = $2"
                f" RETURNING {_STAGE_COLUMNS}",
                dataset,
                expected_version,
                to.value,
                actor,
                reason,
            )
            assert rec is not None  # the row is locked FOR UPDATE at that version
            await _audit(
                conn,
                dataset,
                action,
                actor,
                before["stage"],
                to.value,
                expected_version,
                rec["version"],
                reason,
                forced,
                details or {},
            )
            return _stage_row(rec)

    async def history(self, dataset: str | None = None, limit: int = 100) -> list[AuditRow]:
        async with reaching_postgres():
            rows = await self.pool.fetch(
                "SELECT * FROM bascule_audit WHERE ($1::text IS NULL OR dataset = $1)"
                " ORDER BY id DESC LIMIT $2",
                dataset,
                limit,
            )
        return [_audit_row(r) for r in reversed(rows)]


async def _audit(
    conn: schema.Conn,
    dataset: str,
    action: str,
    actor: str,
    from_stage: str | None,
    to_stage: str | None,
    from_version: int | None,
    to_version: int | None,
    reason: str,
    forced: bool,
    details: Mapping[str, Any],
) -> None:
    await conn.execute(
        "INSERT INTO bascule_audit (dataset, action, actor, from_stage, to_stage, from_version,"
        " to_version, reason, forced, details) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10::jsonb)",
        dataset,
        action,
        actor,
        from_stage,
        to_stage,
        from_version,
        to_version,
        reason,
        forced,
        json.dumps(dict(details)),
    )


async def open_pool(
    url: str, *, max_size: int = 10, connection_class: type[asyncpg.Connection] = asyncpg.Connection
) -> asyncpg.Pool:
    """A pool on the state database that fails fast when Postgres is away (no 60 s hangs).

    ``min_size=0``: creating the pool connects nothing, so a replica can start, and keep
    serving on its last known stages, while Postgres is unreachable.
    """
    pool = asyncpg.create_pool(
        url,
        min_size=0,
        max_size=max_size,
        timeout=2.0,
        command_timeout=5.0,
        max_inactive_connection_lifetime=60.0,
        connection_class=connection_class,
    )
    async with reaching_postgres():
        return await pool


async def schema_check(pool: asyncpg.Pool) -> None:
    """Refuse to run on an unmigrated or newer state schema (the error says what to run)."""
    async with reaching_postgres(), pool.acquire() as conn:
        await schema.check(conn)
