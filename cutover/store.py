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
from cutover.stages import Side, Stage, alters_writes, check_gap_close, opens_gaps


@dataclass(frozen=True, slots=True)
class StageRow:
    dataset: str
    stage: Stage
    version: int
    updated_at: datetime
    updated_by: str
    reason: str
    write_epoch: int = 1
    """Bumped by every change that alters writes (see :func:`cutover.stages.alters_writes`)."""
    gap_source_since: datetime | None = None
    gap_target_since: datetime | None = None
    """Since when each side has missed writes; None: no open gap."""

    @property
    def gaps(self) -> dict[Side, datetime]:
        """The open gaps, by side."""
        found = {Side.SOURCE: self.gap_source_since, Side.TARGET: self.gap_target_since}
        return {side: since for side, since in found.items() if since is not None}

    def as_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "stage": self.stage.value,
            "version": self.version,
            "write_epoch": self.write_epoch,
            "updated_at": self.updated_at.isoformat(),
            "updated_by": self.updated_by,
            "reason": self.reason,
            "gaps": {
                side.value: (self.gaps[side].isoformat() if side in self.gaps else None)
                for side in Side
            },
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


_STAGE_COLUMNS = (
    "dataset, stage, version, updated_at, updated_by, reason, write_epoch,"
    " gap_source_since, gap_target_since"
)


async def _row_for_update(conn: Any, dataset: str) -> asyncpg.Record:
    """The dataset's stage row, locked until the transaction ends; UnknownDataset if none."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_STAGE_COLUMNS} FROM bascule_stage WHERE dataset = $1 FOR UPDATE", dataset
    )
    if row is None:
        names = [r["dataset"] for r in await conn.fetch("SELECT dataset FROM bascule_stage")]
        raise UnknownDataset(dataset, names)
    return row


def _stage_row(rec: asyncpg.Record) -> StageRow:
    return StageRow(
        rec["dataset"],
        Stage(rec["stage"]),
        rec["version"],
        rec["updated_at"],
        rec["updated_by"],
        rec["reason"],
        rec["write_epoch"],
        rec["gap_source_since"],
        rec["gap_target_since"],
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
        """Compare-and-set the stage; append its audit row in the same transaction.

        A change that alters writes bumps the write epoch in the same UPDATE; entering
        ``target`` (``source``) opens the source's (target's) gap marker unless one is open.
        The gap rule itself is the controller's: this is the mechanism, also used directly by
        tests and tools that need a stage whatever the gaps."""
        async with reaching_postgres(), self.pool.acquire() as conn, conn.transaction():
            before = await _row_for_update(conn, dataset)
            if before["version"] != expected_version:
                raise StaleVersion(dataset, expected_version, before["version"])
            current = Stage(before["stage"])
            bump = alters_writes(current, to)
            opened = opens_gaps(current, to)
            rec = await conn.fetchrow(
                "UPDATE bascule_stage SET stage = $3, version = version + 1, updated_at = now(),"
                " updated_by = $4, reason = $5,"
                " write_epoch = write_epoch + CASE WHEN $6 THEN 1 ELSE 0 END,"
                " gap_source_since = CASE WHEN $7 THEN coalesce(gap_source_since, now())"
                "  ELSE gap_source_since END,"
                " gap_target_since = CASE WHEN $8 THEN coalesce(gap_target_since, now())"
                "  ELSE gap_target_since END"
                f" WHERE dataset = $1 AND version = $2 RETURNING {_STAGE_COLUMNS}",
                dataset,
                expected_version,
                to.value,
                actor,
                reason,
                bump,
                Side.SOURCE in opened,
                Side.TARGET in opened,
            )
            assert rec is not None  # the row is locked FOR UPDATE at that version
            recorded = dict(details or {})
            if bump:
                recorded["write_epoch"] = rec["write_epoch"]
            if opened:
                recorded["gaps_opened"] = sorted(side.value for side in opened)
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
                recorded,
            )
            return _stage_row(rec)

    async def close_gap(
        self,
        dataset: str,
        side: Side,
        *,
        actor: str,
        reason: str,
        details: Mapping[str, Any] | None = None,
    ) -> tuple[StageRow, datetime]:
        """Close ``side``'s gap (audited as ``gap-close``); return the row and since when the
        gap was open. Refused when there is no open gap, or while writes do not reach that side.
        The stage's version is not bumped: what replicas run does not change."""
        column = f"gap_{side.value}_since"  # one of two fixed names, never caller text
        async with reaching_postgres(), self.pool.acquire() as conn, conn.transaction():
            before = await _row_for_update(conn, dataset)
            since: datetime | None = before[column]
            check_gap_close(dataset, side, Stage(before["stage"]), since)
            assert since is not None
            rec = await conn.fetchrow(
                f"UPDATE bascule_stage SET {column} = NULL WHERE dataset = $1"
                f" RETURNING {_STAGE_COLUMNS}",
                dataset,
            )
            assert rec is not None  # locked FOR UPDATE above
            await _audit(
                conn,
                dataset,
                "gap-close",
                actor,
                None,
                None,
                None,
                None,
                reason,
                False,
                {
                    **(details or {}),
                    "side": side.value,
                    "since": since.isoformat(),
                    "stage": before["stage"],
                    "version": before["version"],
                },
            )
            return _stage_row(rec), since

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


class StatelessConnection(asyncpg.Connection):
    """A session that only ever runs self-contained statements (no SET, LISTEN, prepared
    state of its own): handing it back to its pool needs no reset round trip (asyncpg's
    ``RESET ALL; UNLISTEN *; ...`` on every release)."""

    def get_reset_query(self) -> str:
        return ""


async def open_pool(
    url: str,
    *,
    max_size: int = 10,
    connection_class: type[asyncpg.Connection] = asyncpg.Connection,
    application_name: str | None = None,
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
        server_settings={"application_name": application_name} if application_name else None,
    )
    async with reaching_postgres():
        return await pool


async def schema_check(pool: asyncpg.Pool) -> None:
    """Refuse to run on an unmigrated or newer state schema (the error says what to run)."""
    async with reaching_postgres(), pool.acquire() as conn:
        await schema.check(conn)
