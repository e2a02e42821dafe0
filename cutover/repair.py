"""Repairs: the authority's rows written onto the other side, under the records' own locks.

Each batch of records is repaired inside :meth:`~bascule.state.journal.Journal.locked`: the
dataset's write fence (shared) and the records' locks, the very locks a researcher's write
through the proxy takes, so no write to them is in flight meanwhile and none starts until the
repair is done. Under them:

1. the stage is read (the fence keeps its authority from moving); a stage that writes one side
   only is not repaired (the other side's gap says it is not kept anyway);
2. a record with an open journal entry is skipped: its pending replay (or resolution) will set
   it, and the caller checks it again afterwards; so is every record while a dataset-wide
   write whose records cannot be told is open;
3. both sides' rows are read again, and only those still different are written: the
   authority's row upserted (``INSERT ... ON CONFLICT (key) DO UPDATE``: the other side's own
   columns are kept, and so are those it generates: :meth:`~cutover.tables.Pair.copied`), or
   deleted where the authority has none;
4. each write is journaled (route :data:`~cutover.journaled.REPAIR_ROUTE`), intent before the
   write and *applied* after it, so the shadow reads' race guard and an incremental
   verification see it like any write.

Rows cross as COPY text under the pinned session settings: exact for every type.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from bascule.config import Config
from bascule.stages import Side, Stage, authority
from bascule.state.journal import Journal, queries
from bascule.state.journal.entries import JOURNALED_STAGES, ORPHANED
from bascule.state.postgres import reaching_postgres
from cutover.checksum import Key, key_hashes
from cutover.journaled import REPAIR_ROUTE, JournalView
from cutover.tables import Conn, Pair, ident, paired, reading, session

BATCH = 50
"""Records locked and written together: a researcher's write to one of them waits for the
batch (a few round trips), never for the whole repair."""


@dataclass
class Outcome:
    upserted: set[Key] = field(default_factory=set)
    deleted: set[Key] = field(default_factory=set)
    equal: set[Key] = field(default_factory=set)
    """Already equal once locked: nothing written."""
    skipped: dict[Key, str] = field(default_factory=dict)
    """Not written now, and why (an open write will set them; check them again)."""

    @property
    def repaired(self) -> set[Key]:
        return self.upserted | self.deleted

    def counts(self) -> dict[str, int]:
        return {
            "upserted": len(self.upserted),
            "deleted": len(self.deleted),
            "equal": len(self.equal),
            "skipped": len(self.skipped),
        }


class Repairer:
    """Writes authorities' rows onto the other side for ``pair``'s table."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        view: JournalView,
        pair: Pair,
        read: Mapping[Side, Conn],
        run: str,
    ) -> None:
        self.config = config
        self.journal = journal
        self.view = view
        self.pair = pair
        self.read = read
        self.run = run
        """Who repairs, for the journal (``verify run 12``, ``backfill run 3``)."""
        self._stack = AsyncExitStack()
        self._writers: dict[Side, Conn] = {}

    async def __aenter__(self) -> Repairer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _writer(self, side: Side) -> Conn:
        if side not in self._writers:
            _, conn = await self._stack.enter_async_context(
                session(self.config, side, "repair", read_only=False)
            )
            self._writers[side] = conn
        return self._writers[side]

    async def repair(self, keys: Collection[Key], outcome: Outcome | None = None) -> Outcome:
        outcome = outcome or Outcome()
        ordered = sorted(keys, key=self.view.token)
        for i in range(0, len(ordered), BATCH):
            await self._batch(ordered[i : i + BATCH], outcome)
        return outcome

    async def _batch(self, keys: list[Key], outcome: Outcome) -> None:
        dataset = self.view.dataset
        tokens = {self.view.token(k): k for k in keys}
        async with self.journal.locked(dataset, tokens) as held:
            async with reaching_postgres():
                stage = await held.conn.fetchrow(
                    "SELECT stage, version, write_epoch FROM bascule_stage WHERE dataset = $1",
                    dataset,
                )
            if stage is None or stage["stage"] not in JOURNALED_STAGES:
                for k in keys:
                    outcome.skipped[k] = "its stage writes one side only"
                return
            auth = authority(Stage(stage["stage"]))
            other = Side.TARGET if auth is Side.SOURCE else Side.SOURCE
            busy = await self.view.open_on(tokens)
            candidates = [k for t, k in tokens.items() if t not in busy]
            for t, k in tokens.items():
                if t in busy:
                    outcome.skipped[k] = "a write to it is still open in the journal"
            if not candidates:
                return
            theirs, ours = await paired(
                key_hashes(self.read[auth], self.pair, auth, candidates),
                key_hashes(self.read[other], self.pair, other, candidates),
            )
            fix = [k for k in candidates if theirs.get(k) != ours.get(k)]
            outcome.equal.update(k for k in candidates if theirs.get(k) == ours.get(k))
            if not fix:
                return
            upserts = [k for k in fix if k in theirs]
            deletes = [k for k in fix if k not in theirs]
            seqs = []
            for k in fix:
                method = "PUT" if k in theirs else "DELETE"
                seqs.append(
                    await held.intent(
                        record=self.view.token(k),
                        route=REPAIR_ROUTE,
                        method=method,
                        authority=auth.value,
                        stage_version=stage["version"],
                        write_epoch=stage["write_epoch"],
                        request={
                            "method": method,
                            "target": "",
                            "key": k,
                            "headers": [],
                            "body": "",
                            "repair": self.run,
                        },
                    )
                )
            try:
                await self._write(auth, other, upserts, deletes)
            except BaseException:
                # Not written (or not known to be): the entries say nothing was applied; the
                # caller's re-check finds whatever is left.
                for seq in seqs:
                    with contextlib.suppress(Exception):
                        await self.journal.decide(seq, "rejected", dataset=dataset)
                raise
            for seq in seqs:
                await self.journal.decide(seq, "applied", dataset=dataset)
            outcome.upserted.update(upserts)
            outcome.deleted.update(deletes)

    async def _write(self, auth: Side, other: Side, upserts: list[Key], deletes: list[Key]) -> None:
        pair = self.pair
        source_table, target_table = pair.side(auth), pair.side(other)
        key = ident(pair.key)
        rows = b""
        if upserts:
            async with reading(source_table.backend, f"reading rows of {source_table.qualified}"):
                cur = self.read[auth].cursor()
                async with cur.copy(
                    f"COPY (SELECT {pair.columns_list(other, 't')} FROM {source_table.qualified} t"
                    f" WHERE t.{key} = ANY({pair.keys_param()})) TO STDOUT",
                    [upserts],
                ) as copy:
                    rows = b"".join([bytes(block) async for block in copy])
        conn = await self._writer(other)
        async with reading(target_table.backend, f"repairing rows of {target_table.qualified}"):
            async with conn.transaction():
                if rows:
                    await upsert(conn, pair, other, rows)
                if deletes:
                    await conn.execute(
                        f"DELETE FROM {target_table.qualified} t"
                        f" WHERE t.{key} = ANY({pair.keys_param()})",
                        [deletes],
                    )


async def staging(conn: Conn, pair: Pair, side: Side) -> str:
    """This session's staging table for ``pair`` on ``side`` (temporary, emptied): the columns
    written into ``side`` (:meth:`~cutover.tables.Pair.copied`), as plain columns."""
    table = pair.side(side)
    name = f"bascule_rows_{table.oid}"
    await conn.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {name} AS"
        f" SELECT {pair.columns_list(side)} FROM {table.qualified} WITH NO DATA"
    )
    await conn.execute(f"TRUNCATE {name}")
    return name


async def upsert(conn: Conn, pair: Pair, side: Side, rows: bytes, *, keep: bool = False) -> int:
    """Write COPY text ``rows`` into ``side``'s table through a staging table: each row
    replaces the row of its key (``keep``: a row already there wins). How many were written.
    In the caller's transaction. ``rows``: :meth:`~cutover.tables.Pair.copied` into ``side``."""
    table = pair.side(side)
    columns = pair.columns_list(side)
    temp = await staging(conn, pair, side)
    async with conn.cursor().copy(f"COPY {temp} ({columns}) FROM STDIN") as copy:
        await copy.write(rows)
    others = pair.updatable(side)
    if keep or not others:
        conflict = "DO NOTHING"
    else:
        conflict = "DO UPDATE SET " + ", ".join(f"{ident(c)} = excluded.{ident(c)}" for c in others)
    cur = await conn.execute(
        f"INSERT INTO {table.qualified} ({columns}){pair.overriding(side)}"
        f" SELECT {columns} FROM {temp} ON CONFLICT ({ident(pair.key)}) {conflict}"
    )
    written: int = cur.rowcount
    return written


async def clear_interrupted(journal: Journal, dataset: str, actor: str) -> int:
    """Settle the repair entries a dead data job left open (its process ended between a
    repair's intent and its outcome): in doubt, then skipped, audited. Whether that repair was
    written does not matter any more: the job now starting checks the data again. Called under
    the dataset's data lock, so no repair of it is running. How many were settled."""
    async with reaching_postgres():
        rows = await journal.pool.fetch(
            "SELECT j.seq, j.state FROM bascule_journal j WHERE j.dataset = $1 AND j.route = $2"
            f" AND (j.state = 'in_doubt' OR {ORPHANED})",
            dataset,
            REPAIR_ROUTE,
        )
    for row in rows:
        if row["state"] == "intent":
            await journal.decide(
                row["seq"], "in_doubt", dataset=dataset, error="its repair was interrupted"
            )
        await queries.skip(
            journal.pool,
            row["seq"],
            actor=actor,
            reason="a repair interrupted before its outcome; the data is checked again",
        )
    return len(rows)
