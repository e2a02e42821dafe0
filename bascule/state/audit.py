"""The audit trail: the one writer of ``bascule_audit`` rows, and their reader.

Every change an operator or the controller makes (a stage, a gap closed, a journal entry
skipped, a noise rule decided) is recorded here, always with the same columns, in the same
transaction as the change itself: no change without its audit, no audit of a change that did
not happen.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from bascule.state import schema
from bascule.state.postgres import reaching_postgres


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


async def record(
    conn: schema.Conn,
    dataset: str,
    action: str,
    *,
    actor: str,
    reason: str,
    from_stage: str | None = None,
    to_stage: str | None = None,
    from_version: int | None = None,
    to_version: int | None = None,
    forced: bool = False,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Append one audit row on ``conn``, inside the caller's transaction."""
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
        json.dumps(dict(details or {})),
    )


async def history(
    pool: asyncpg.Pool, dataset: str | None = None, limit: int = 100
) -> list[AuditRow]:
    """The latest ``limit`` rows (of ``dataset``, or of all), oldest first."""
    async with reaching_postgres():
        rows = await pool.fetch(
            "SELECT * FROM bascule_audit WHERE ($1::text IS NULL OR dataset = $1)"
            " ORDER BY id DESC LIMIT $2",
            dataset,
            limit,
        )
    return [AuditRow(**{**dict(r), "details": json.loads(r["details"])}) for r in reversed(rows)]
