"""What the journal says about a dataset's records, for verification, repair and backfill.

The journal names records by token; their keys are in the sealed bodies (a keyed write's
request carries its key; a create's key is in its authoritative answer, at the route's
``create_id``). Opening them needs the journal key, as the replayer does.

- :meth:`JournalView.touched`: which of some records a write may have changed since a moment
  (or may still change): a difference on them may be a write in flight, not a divergence.
- :meth:`JournalView.keys_since`: the keys written since a moment, for an incremental
  verification and a backfill's final settling. A write whose records cannot be told (a
  dataset-wide write that is not a create, or a create whose answer is unknown) makes the set
  unknowable: the answer says so, and the caller refuses or falls back to a full sweep.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from bascule.config import Config, Route
from bascule.sealing import DATASET_WIDE, Namer
from bascule.state.journal import Journal
from bascule.state.journal.entries import OPEN, OPEN_SQL
from bascule.state.postgres import reaching_postgres

REPAIR_ROUTE = "bascule:repair"
"""The route of a journal entry that records a repair (or a backfill's settling) of one record:
never a researcher's route, so nothing replays or re-sends it."""

_NEVER = 2**62
"""A sequence number no entry reaches: ``touched(after=_NEVER)`` asks about open entries only."""


@dataclass
class Touched:
    tokens: set[str] = field(default_factory=set)
    everything: bool = False
    """A write whose records cannot be told (dataset-wide, or a create not yet answered)."""

    def __contains__(self, token: str) -> bool:
        return self.everything or token in self.tokens


@dataclass
class Written:
    keys: set[str] = field(default_factory=set)
    unknowable: int = 0
    """Writes whose records cannot be told: with any, ``keys`` is not the whole story."""
    blind: int = 0
    """Of those, the dataset-wide writes that are not creates: they may have changed (and
    moved) any existing row. (A create whose answer is unknown made a new row, if any.)"""
    entries: int = 0


class JournalView:
    """One dataset's journal, read by verification, repair and backfill."""

    def __init__(self, journal: Journal, namer: Namer, config: Config, dataset: str) -> None:
        self.journal = journal
        self.pool: asyncpg.Pool = journal.pool
        self.namer = namer
        self.dataset = dataset
        self.creates: dict[tuple[str, str], Route] = {
            (route.path, method): route
            for route in config.routes
            if route.kind == "write" and route.create_id is not None
            for method in route.methods
        }

    def token(self, key: str) -> str:
        return self.namer.record(self.dataset, key)

    def open(self, sealed: bytes, field: str) -> bytes:
        """A sealed body of this dataset's journal (SealError with a wrong key)."""
        return self.journal.sealer.open(sealed, dataset=self.dataset, field=field)

    async def high(self) -> int:
        """The journal's highest sequence number now: every write whose effect a read made
        after this could not see has a higher one (its intent commits before it is sent)."""
        async with reaching_postgres():
            found: int = await self.pool.fetchval(
                "SELECT coalesce(max(seq), 0) FROM bascule_journal"
            )
        return found

    async def open_on(self, tokens: Collection[str]) -> Touched:
        """Of ``tokens``, those with a write still open in the journal."""
        return await self.touched(tokens, after=_NEVER)

    async def quiet(self, tokens: Collection[str], within: float) -> bool:
        """Wait until no open entry touches ``tokens`` (nor a dataset-wide write whose records
        cannot be told), at most ``within`` seconds; True if none is left. Only these entries
        can explain a difference on those records: the rest of the dataset's backlog, however
        long under a steady write rate, does not need to drain first."""
        deadline = time.monotonic() + within
        pause = 0.05
        while True:
            busy = await self.open_on(tokens)
            if not busy.everything and not busy.tokens:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def touched(
        self, tokens: Collection[str], after: int, settled_since: datetime | None = None
    ) -> Touched:
        """Of ``tokens``, those a write may have changed since sequence ``after`` or may still
        change (an entry after it, or one still open; with ``settled_since``, also one decided
        or replayed since then: a write whose intent was not yet visible when ``after`` was
        read); ``everything`` when a write whose records cannot be told is among them."""
        found = Touched()
        # Three index ranges (by sequence, the open entries, the settled ones by time), never a
        # pass over a week of journal. Many tokens: every entry of those ranges, kept here.
        # The records (and the dataset-wide token) as one array: one index range per record.
        few = len(tokens) <= 1000
        mine = "dataset = $1 AND " + (
            "record = ANY($3::text[] || $4::text)" if few else "$3::text[] IS NOT NULL"
        )
        columns = "seq, record, route, method, state, CASE WHEN record = $4 THEN answer END"
        async with reaching_postgres(), self.pool.acquire() as conn, conn.transaction():
            # By index scan, not bitmap scans (as the replayer's wave, migration 0011): a
            # bitmap scan of the open entries reads every dead version the queue left there
            # (two for each write since the last VACUUM) again on every call, and ``quiet``
            # calls up to 20 times a second; an index scan marks them dead and skips them.
            await conn.execute("SET LOCAL enable_bitmapscan = off; SET LOCAL enable_seqscan = off")
            rows = await conn.fetch(
                f"SELECT {columns} AS answer FROM bascule_journal WHERE {mine} AND seq > $2"
                f" UNION ALL SELECT {columns} FROM bascule_journal"
                f" WHERE {mine} AND state IN {OPEN_SQL}"
                f" UNION ALL SELECT {columns} FROM bascule_journal"
                f" WHERE {mine} AND state IN ('applied', 'skipped') AND applied_at >= $5",
                self.dataset,
                after,
                list(tokens) if few else [],
                DATASET_WIDE,
                settled_since,
            )
        for r in rows:
            if r["record"] != DATASET_WIDE:
                found.tokens.add(r["record"])
                continue
            key = self._created(r)
            if key is None:
                if r["state"] != "rejected":
                    found.everything = True
            elif key:
                found.tokens.add(self.token(key))
        return found

    async def keys_since(self, since: datetime) -> Written:
        """The keys of every write that may have changed a side since ``since``: settled
        since then, or still open."""
        written = Written()
        last = 0
        while True:
            async with reaching_postgres():
                rows = await self.pool.fetch(
                    "SELECT seq, record, route, method, state, request, answer"
                    " FROM bascule_journal WHERE dataset = $1 AND seq > $2 AND ("
                    " state = ANY($3::text[])"
                    " OR (state IN ('applied', 'skipped') AND applied_at >= $4))"
                    " ORDER BY seq LIMIT 5000",
                    self.dataset,
                    last,
                    list(OPEN),
                    since,
                )
            if not rows:
                return written
            last = rows[-1]["seq"]
            written.entries += len(rows)
            for r in rows:
                if r["record"] != DATASET_WIDE:
                    request = json.loads(self.open(r["request"], "request"))
                    # A create is its record's once its answer named it: its key is there.
                    key = request.get("key")
                    made = self._created(r) if key is None else str(key)
                    if made:
                        written.keys.add(made)
                    elif made is None:
                        written.unknowable += 1
                    continue
                key = self._created(r)
                if key is None:
                    written.unknowable += 1
                    if (r["route"], r["method"]) not in self.creates:
                        written.blind += 1
                elif key:
                    written.keys.add(key)

    def _created(self, row: asyncpg.Record) -> str | None:
        """The key a dataset-wide entry created; "" when it changed nothing (refused); None
        when that cannot be told (not a create, or its answer is not known yet)."""
        route = self.creates.get((row["route"], row["method"]))
        if route is None or route.create_id is None:
            return None
        if row["state"] == "rejected":
            return ""
        if row["answer"] is None:
            return None
        try:
            stored = json.loads(self.open(row["answer"], "answer"))
            if not 200 <= int(stored["status"]) < 300:
                return None  # an error answer (in doubt): whether it created is unknown
            body = json.loads(base64.b64decode(stored["body"]))
            value = pointer(body, route.create_id)
        except (ValueError, KeyError, TypeError):
            return None
        if isinstance(value, bool) or not isinstance(value, int | str):
            return None
        return str(value)


def pointer(document: Any, path: str) -> Any:
    """The value at JSON pointer ``path`` (RFC 6901) in ``document``; KeyError if absent."""
    found = document
    for raw in path.split("/")[1:]:
        segment = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(found, dict):
            found = found[segment]
        elif isinstance(found, list) and segment.isdigit():
            found = found[int(segment)]
        else:
            raise KeyError(path)
    return found


def tokens_of(view: JournalView, keys: Iterable[str]) -> dict[str, str]:
    """Token -> key."""
    return {view.token(k): k for k in keys}
