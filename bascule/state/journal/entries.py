"""A journal entry: its states, which state may follow which, and its row.

An entry is one researcher write in a stage that writes both sides: its *intent* (committed
before the call), its *outcome* on the authoritative side, then its replay to the other side.
Which stages journal, and which side is authoritative in each, come from the stage table
(:mod:`bascule.stages`): never restated here, in Python or in SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg

from bascule.stages import ORDER, Side, authority, written

JOURNALED_STAGES: tuple[str, ...] = tuple(
    stage.value for stage in ORDER if written(stage) == frozenset(Side)
)
"""Stages that write both sides: their writes are journaled."""

AUTHORITY_SQL = (
    "CASE s.stage "
    + " ".join(f"WHEN '{stage.value}' THEN '{authority(stage).value}'" for stage in ORDER)
    + " END"
)
"""The authoritative side of the stage in ``s.stage``, as SQL (from the stage table)."""

State = Literal["intent", "pending", "applied", "rejected", "in_doubt", "dead", "skipped"]
OPEN: tuple[State, ...] = ("intent", "pending", "in_doubt", "dead")
"""States that hold back later entries of the same record."""
OPEN_SQL = "(" + ", ".join(f"'{state}'" for state in OPEN) + ")"
"""The same, as an SQL list for ``state IN``: a literal proves the open-entry indexes'
predicate, where a parameter would not (migration 0011)."""

# Which state may follow which: anything else is a bug, refused by the database update.
NEXT: dict[str, tuple[State, ...]] = {
    # intent -> applied: a repair (``cutover/repair.py``) writes the authority's row onto the
    # other side itself, under the record's lock: nothing is left to replay once it is done.
    "intent": ("pending", "rejected", "in_doubt", "applied"),
    "in_doubt": ("pending", "rejected", "skipped"),
    "pending": ("applied", "dead", "skipped"),
    "dead": ("pending", "skipped"),
}

ORPHANED = (
    "j.state = 'intent' AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a"
    " WHERE a.pid = j.writer_pid AND a.backend_start = j.writer_started)"
)
"""An entry (``j``) still at intent whose writer's session has ended: its lock is gone with
it, so nobody else will ever record its outcome (a pid alone can be reused: with its start)."""


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    dataset: str
    record: str
    route: str
    method: str
    authority: str
    stage_version: int
    state: State
    status: int | None
    attempts: int
    created_at: datetime
    last_error: str | None
    traceparent: str | None = None
    """The W3C ``traceparent`` of the request that journaled it (its replay's span links it)."""


COLUMNS = (
    "seq, dataset, record, route, method, authority, stage_version, state, status, attempts,"
    " created_at, last_error, traceparent"
)
_FIELDS = tuple(c.strip() for c in COLUMNS.split(","))
J_COLUMNS = ", ".join(f"j.{c}" for c in _FIELDS).replace("j.seq", "seq")
"""The entry's columns of a query on ``bascule_journal j``."""


def entry(rec: asyncpg.Record) -> Entry:
    return Entry(**{f: rec[f] for f in _FIELDS})


class IllegalTransition(RuntimeError):
    """An entry was asked to move to a state its current state cannot lead to."""
