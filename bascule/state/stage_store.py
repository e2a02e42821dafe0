"""The stage store: each dataset's stage as durable truth in Postgres, with its audit trail.

A stage changes only by compare-and-set on its version, in the same transaction as the audit
row that says who, when, from, to and why: there is no change without its audit, and no audit
of a change that did not happen.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from bascule.errors import Refused, StaleVersion, UnknownDataset
from bascule.stages import (
    Side,
    Stage,
    alters_writes,
    check_gap_close,
    opens_gaps,
    resumes_writes,
    when,
)
from bascule.state import audit
from bascule.state.audit import AuditRow
from bascule.state.postgres import reaching_postgres


@dataclass(frozen=True, slots=True)
class StageRow:
    dataset: str
    stage: Stage
    version: int
    updated_at: datetime
    updated_by: str
    reason: str
    write_epoch: int = 1
    """Bumped by every change that alters writes (see :func:`bascule.stages.alters_writes`)."""
    gap_source_since: datetime | None = None
    gap_target_since: datetime | None = None
    """Since when each side has missed writes; None: no open gap."""
    gap_source_opened: datetime | None = None
    gap_target_opened: datetime | None = None
    """When each side last missed a write or started being written again, its gap closed
    since or not: its *latest miss*. The gate wants a clean verification begun after it; a
    gap closes only on a verification begun after it."""
    auto_promote: bool | None = None
    """As operators and the controller left it: None follows the configuration's
    ``auto_promote``; False once an automatic rollback turned it off."""

    @property
    def last_gap_opened(self) -> datetime | None:
        """When the latest gap of either side opened (None: never, as far as recorded)."""
        opened = [t for t in (self.gap_source_opened, self.gap_target_opened) if t is not None]
        return max(opened, default=None)

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
            "auto_promote": self.auto_promote,
        }


_STAGE_COLUMNS = (
    "dataset, stage, version, updated_at, updated_by, reason, write_epoch,"
    " gap_source_since, gap_target_since, gap_source_opened, gap_target_opened, auto_promote"
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
        rec["gap_source_opened"],
        rec["gap_target_opened"],
        rec["auto_promote"],
    )


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
                    await audit.record(
                        conn,
                        name,
                        "register",
                        actor=actor,
                        reason="registered from the configuration",
                        to_stage="source",
                        to_version=1,
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
        changed = await self.change_many(
            [(dataset, expected_version, details)],
            to,
            actor=actor,
            reason=reason,
            action=action,
            forced=forced,
        )
        return changed[0]

    async def change_many(
        self,
        changes: Sequence[tuple[str, int, Mapping[str, Any] | None]],
        to: Stage,
        *,
        actor: str,
        reason: str,
        action: str = "stage",
        forced: bool = False,
        check: Callable[[Any, list[StageRow]], Awaitable[None]] | None = None,
    ) -> list[StageRow]:
        """:meth:`change` of several datasets (``(dataset, expected version, audit details)``)
        to one stage, all or none, in one transaction: a group moving together. Rows are locked
        in name order, so two such changes cannot deadlock. ``check(conn, rows)`` runs on the
        locked rows before anything is written, in the transaction: what it raises refuses the
        change (a rule judged again on rows nothing else can change until the commit)."""
        rows: list[StageRow] = []
        async with reaching_postgres(), self.pool.acquire() as conn, conn.transaction():
            if check is not None:
                locked = [
                    _stage_row(await _row_for_update(conn, dataset))
                    for dataset, _, _ in sorted(changes, key=lambda c: c[0])
                ]
                await check(conn, locked)
            for dataset, expected_version, details in sorted(changes, key=lambda c: c[0]):
                rows.append(
                    await _change_on(
                        conn, dataset, expected_version, to, actor, reason, action, forced, details
                    )
                )
        return rows

    async def close_gap(
        self,
        dataset: str,
        side: Side,
        *,
        actor: str,
        reason: str,
        details: Mapping[str, Any] | None = None,
        opened_before: datetime | None = None,
    ) -> tuple[StageRow, datetime]:
        """Close ``side``'s gap (audited as ``gap-close``); return the row and since when the
        gap was open. Refused when there is no open gap, or while writes do not reach that side.
        ``opened_before``: only if the side last missed a write before then (a verification
        closes only what its rows, read from then on, have seen). The stage's version is not
        bumped: what replicas run does not change."""
        column = f"gap_{side.value}_since"  # one of two fixed names, never caller text
        async with reaching_postgres(), self.pool.acquire() as conn, conn.transaction():
            before = await _row_for_update(conn, dataset)
            since: datetime | None = before[column]
            check_gap_close(dataset, side, Stage(before["stage"]), since)
            assert since is not None
            opened: datetime | None = before[f"gap_{side.value}_opened"]
            if opened_before is not None and opened is not None and opened > opened_before:
                raise Refused(
                    f"{dataset}: the {side.value} missed a write at {when(opened)}, after this "
                    f"run began reading at {when(opened_before)}: its gap stays open"
                )
            rec = await conn.fetchrow(
                f"UPDATE bascule_stage SET {column} = NULL WHERE dataset = $1"
                f" RETURNING {_STAGE_COLUMNS}",
                dataset,
            )
            assert rec is not None  # locked FOR UPDATE above
            await audit.record(
                conn,
                dataset,
                "gap-close",
                actor=actor,
                reason=reason,
                details={
                    **(details or {}),
                    "side": side.value,
                    "since": since.isoformat(),
                    "stage": before["stage"],
                    "version": before["version"],
                },
            )
            return _stage_row(rec), since

    async def set_auto_promote(
        self,
        dataset: str,
        value: bool | None,
        *,
        actor: str,
        reason: str,
        details: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> StageRow:
        """Turn ``auto_promote`` off (``False``: an automatic rollback did, or an operator), or
        back to what the configuration says (``None``); audited as ``auto-promote``. Nothing is
        written (nor audited) when it is that already. ``expected_version``: refused
        (StaleVersion) once the stage has moved past it (a decision taken on an older row). The
        stage's version is not bumped: writes and reads are unaffected."""
        async with reaching_postgres(), self.pool.acquire() as conn, conn.transaction():
            before = await _row_for_update(conn, dataset)
            if expected_version is not None and before["version"] != expected_version:
                raise StaleVersion(dataset, expected_version, before["version"])
            if before["auto_promote"] is value:
                return _stage_row(before)
            rec = await conn.fetchrow(
                f"UPDATE bascule_stage SET auto_promote = $2 WHERE dataset = $1"
                f" RETURNING {_STAGE_COLUMNS}",
                dataset,
                value,
            )
            assert rec is not None  # locked FOR UPDATE above
            await audit.record(
                conn,
                dataset,
                "auto-promote",
                actor=actor,
                reason=reason,
                details={
                    **(details or {}),
                    "was": before["auto_promote"],
                    "now": value,
                    "stage": before["stage"],
                    "version": before["version"],
                },
            )
            return _stage_row(rec)

    async def history(self, dataset: str | None = None, limit: int = 100) -> list[AuditRow]:
        return await audit.history(self.pool, dataset, limit)


async def open_gap(conn: Any, dataset: str, side: Side) -> bool:
    """Open ``side``'s gap (it may be missing a write), on ``conn`` inside the caller's
    transaction; False when one was open already (its older ``since`` is kept). Either way the
    side's latest miss (``*_opened``) is now: a verification must have read its rows after it
    (one begun before could not have seen this write missing)."""
    column = f"gap_{side.value}"  # one of two fixed names, never caller text
    was_open: bool | None = await conn.fetchval(
        f"UPDATE bascule_stage SET {column}_opened = now(),"
        f" {column}_since = coalesce({column}_since, now())"
        f" WHERE dataset = $1 RETURNING {column}_since < now()",
        dataset,
    )
    return not was_open


async def _change_on(
    conn: Any,
    dataset: str,
    expected_version: int,
    to: Stage,
    actor: str,
    reason: str,
    action: str,
    forced: bool,
    details: Mapping[str, Any] | None,
) -> StageRow:
    """One compare-and-set with its audit row, inside the caller's transaction."""
    before = await _row_for_update(conn, dataset)
    if before["version"] != expected_version:
        raise StaleVersion(dataset, expected_version, before["version"])
    current = Stage(before["stage"])
    bump = alters_writes(current, to)
    opened = opens_gaps(current, to)
    # A side's latest miss is now when it starts missing writes (its gap opens, or stays open
    # with a newer miss) and when it starts being written again: a verification begun before
    # either could not have seen what it missed (docs/decisions.md).
    resumed = resumes_writes(current, to)
    rec = await conn.fetchrow(
        "UPDATE bascule_stage SET stage = $3, version = version + 1, updated_at = now(),"
        " updated_by = $4, reason = $5,"
        " write_epoch = write_epoch + CASE WHEN $6 THEN 1 ELSE 0 END,"
        " gap_source_opened = CASE WHEN $7 OR $9 THEN now() ELSE gap_source_opened END,"
        " gap_target_opened = CASE WHEN $8 OR $10 THEN now() ELSE gap_target_opened END,"
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
        Side.SOURCE in resumed,
        Side.TARGET in resumed,
    )
    assert rec is not None  # the row is locked FOR UPDATE at that version
    recorded = dict(details or {})
    if bump:
        recorded["write_epoch"] = rec["write_epoch"]
    if opened:
        recorded["gaps_opened"] = sorted(side.value for side in opened)
    await audit.record(
        conn,
        dataset,
        action,
        actor=actor,
        reason=reason,
        from_stage=before["stage"],
        to_stage=to.value,
        from_version=expected_version,
        to_version=rec["version"],
        forced=forced,
        details=recorded,
    )
    return _stage_row(rec)
