"""Backfill: the source's rows streamed into the target's table, while writes keep flowing.

``bascule backfill DATASET`` runs only in ``dualwrite`` once every live replica runs that stage
version: from then on every new write reaches both sides (journaled, replayed), so what the
target lacks is what was written before, which the backfill copies. Rows go in key order, in
batches of :data:`BATCH_ROWS`, through COPY (psycopg ``cursor.copy``: the source's ``COPY
... TO STDOUT`` relayed block by block into the target's ``COPY ... FROM STDIN``), each batch
one transaction on the target followed by a checkpoint, so an interrupted backfill resumes at
the batch it was in.

A row written through the proxy meanwhile is never overwritten with older data:

- a batch whose key range is empty on the target is copied straight into the table; if a
  replay lands a row in the range first, the copy fails on its key and the batch goes the
  other way;
- otherwise rows go into a staging table, then ``INSERT ... ON CONFLICT DO NOTHING``: a row
  already there (newer) wins;
- what a copy cannot get right by itself, a write during the copy that it then overwrote or
  resurrected (a delete replayed to the target before the row was copied there), is settled
  at the end: every key the journal shows written since the backfill began is compared, and
  differing ones are repaired under their record locks, as ``verify --repair`` does.

It ends with a full verification; a clean one closes the target's gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.copy import AsyncQueuedLibpqWriter

from bascule.errors import Refused
from bascule.stages import Side, Stage
from bascule.state import replicas
from cutover.checksum import Key, Range, key_hashes, predicate, thresholds
from cutover.job import Job
from cutover.repair import staging
from cutover.tables import Conn, Pair, ident, paired, reading, session
from cutover.verify import Options, VerifyReport, describe, settle, verify

BATCH_ROWS = 65536
"""Rows per batch: per transaction on the target and per checkpoint (about 10 MB of a
dcir-shaped table). A batch redone after an interruption costs at most this many rows again."""


@dataclass
class TableCopy:
    table: str
    rows: int = 0
    """Rows written into the target's table by this backfill (resumed ones included)."""
    nbytes: int = 0
    direct: int = 0
    staged: int = 0
    seconds: float = 0.0
    copied: int = 0
    """Rows streamed by this run."""
    copied_bytes: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "rows": self.rows,
            "bytes": self.nbytes,
            "batches": {"direct": self.direct, "staged": self.staged},
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.copied / self.seconds) if self.seconds else 0,
            "mb_per_second": round(self.copied_bytes / self.seconds / 1e6, 2)
            if self.seconds
            else 0,
        }


@dataclass
class BackfillReport:
    run: int
    dataset: str
    status: str = "running"
    tables: list[TableCopy] = field(default_factory=list)
    settled: dict[str, Any] = field(default_factory=dict)
    verification: VerifyReport | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        if self.verification is None:
            return 1
        return self.verification.exit_code

    def figures(self) -> dict[str, Any]:
        return {
            "tables": [t.as_json() for t in self.tables],
            "settled": self.settled,
            "seconds": round(self.seconds, 3),
            "verify_run": self.verification.run if self.verification else None,
        }

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run": self.run,
            "dataset": self.dataset,
            "status": self.status,
            **self.figures(),
        }
        if self.verification is not None:
            out["verification"] = self.verification.as_json()
        if self.error:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class BackfillOptions:
    resume: bool = False
    batch_rows: int = BATCH_ROWS
    verify: Options = field(default_factory=Options)


async def backfill(job: Job, options: BackfillOptions) -> BackfillReport:
    """Copy what the target lacks, settle what was written meanwhile, verify."""
    started = time.monotonic()
    name = job.dataset
    stage = await job.store.get(name)
    if stage.stage is not Stage.DUALWRITE:
        raise Refused(
            f"{name}: a backfill runs in dualwrite only (the dataset is in {stage.stage.value}): "
            "there, every new write reaches both sides while the old rows are copied"
        )
    behind = await replicas.lagging(job.store.pool, name, stage.version)
    if behind:
        raise Refused(
            f"{name}: replica(s) {', '.join(behind)} have not confirmed stage version "
            f"{stage.version} (dualwrite) yet: their writes might not reach the target; "
            "wait for them (`bascule status`) and try again"
        )
    for pair in job.pairs:
        lost = (*pair.schema.only_source, *(c for c, _, _ in pair.schema.type_changed))
        if lost:
            raise Refused(
                f"{name}: the target's table {pair.target.qualified} lacks or retypes the "
                f"source's column(s) {', '.join(lost)}: a backfill would lose them"
            )
    resumed = None
    if options.resume:
        resumed = await job.runs.resumable("backfill")
        if resumed is None:
            raise Refused(
                f"{name}: no interrupted backfill to resume (the latest finished); run it "
                "without --resume"
            )
    run, since = await job.runs.start_backfill(
        stage_version=stage.version, actor=job.actor, resumed=resumed
    )
    report = BackfillReport(run, name)
    try:
        saved = await job.runs.checkpoints("backfill", run)
        for pair in job.pairs:
            report.tables.append(await _copy(job, run, pair, saved.get(pair.name), options))
        for pair in job.pairs:
            report.settled = await _settle(job, pair, since, options, run)
        job.progress.note(f"{name}: verifying")
        report.verification = await verify(job, options.verify, backfill_run=run)
    except BaseException as exc:
        interrupted = isinstance(exc, asyncio.CancelledError | KeyboardInterrupt)
        report.status = "interrupted" if interrupted else "failed"
        report.seconds = time.monotonic() - started
        with contextlib.suppress(Exception):
            await job.runs.finish(
                "backfill", run, report.status, report.figures(), error=describe(exc)
            )
        raise
    report.seconds = time.monotonic() - started
    verified = report.verification.status
    report.status = {"clean": "done", "divergent": "divergent"}.get(verified, "failed")
    await job.runs.finish(
        "backfill",
        run,
        report.status,
        report.figures(),
        verify_run=report.verification.run,
    )
    return report


def _index_ordered(pair: Pair, side: Side) -> bool:
    """Can ``side``'s key index serve the agreed order (range reads without a sort)?"""
    collation = pair.side(side).key_column.collation
    return collation is None or collation in ("C", "POSIX")


async def _copy(
    job: Job,
    run: int,
    pair: Pair,
    saved: Mapping[str, Any] | None,
    options: BackfillOptions,
) -> TableCopy:
    found = TableCopy(pair.name)
    position: dict[str, Any] = dict(saved["position"]) if saved and saved["position"] else {}
    if saved:
        found.rows, found.nbytes = saved["rows"], saved["bytes"]
        if saved["done"]:
            return found
    src = job.conns[Side.SOURCE]
    start: Key | None = position.get("next")
    starts: list[Key] | None = None
    if not _index_ordered(pair, Side.SOURCE):
        # Keyset pages would each sort the rest of the table: cut it once instead.
        where = predicate(pair, [Range(start, None)])
        starts = await thresholds(src, pair, Side.SOURCE, options.batch_rows, where)
    estimate = pair.source.estimate
    job.progress.start("copy", estimate - found.rows if estimate > 0 else None)
    began = time.monotonic()
    async with session(job.config, Side.TARGET, "backfill", read_only=False) as (_, tgt):
        while True:
            if starts is not None:
                end: Key | None = starts.pop(0) if starts else None
            else:
                end = await _next_start(src, pair, start, options.batch_rows)
            batch = Range(start, end)
            rows, nbytes, direct = await _batch(src, tgt, pair, batch)
            found.rows += rows
            found.copied += rows
            found.nbytes += nbytes
            found.copied_bytes += nbytes
            if direct:
                found.direct += 1
            else:
                found.staged += 1
            job.progress.advance("copy", rows, nbytes)
            start = end
            await job.runs.checkpoint(
                "backfill",
                run,
                pair.name,
                {"next": start},
                done=end is None,
                rows=found.rows,
                nbytes=found.nbytes,
            )
            if end is None:
                break
    found.seconds = time.monotonic() - began
    job.progress.done("copy")
    return found


async def _next_start(src: Conn, pair: Pair, start: Key | None, rows: int) -> Key | None:
    """The first key of the batch after the one starting at ``start`` (None: it is the last)."""
    where, params = predicate(pair, [Range(start, None)])
    table = pair.source
    async with reading(table.backend, f"paging through {table.qualified}"):
        cur = await src.execute(
            f"SELECT t.{ident(pair.key)}::text FROM {table.qualified} t WHERE {where}"
            f" ORDER BY {pair.key_order()} OFFSET {int(rows)} LIMIT 1",
            params,
        )
        row = await cur.fetchone()
    return None if row is None else str(row[0])


async def _batch(src: Conn, tgt: Conn, pair: Pair, batch: Range) -> tuple[int, int, bool]:
    """Copy one batch; (rows written, bytes streamed, whether it went straight in)."""
    where, params = predicate(pair, [batch])
    out = (
        f"COPY (SELECT {pair.columns_list('t')} FROM {pair.source.qualified} t WHERE {where}"
        f" ORDER BY {pair.key_order()}) TO STDOUT"
    )
    target = pair.target
    both = f"{pair.source.backend} -> {target.backend}"
    async with reading(both, f"backfilling {target.qualified}"):
        empty = False
        if _index_ordered(pair, Side.TARGET):
            cur = await tgt.execute(
                f"SELECT NOT EXISTS (SELECT 1 FROM {target.qualified} t WHERE {where})", params
            )
            row = await cur.fetchone()
            empty = bool(row and row[0])
        async with tgt.transaction():
            if empty:
                try:
                    async with tgt.transaction():  # a savepoint: a replay may have come first
                        into = f"COPY {target.qualified} ({pair.columns_list()}) FROM STDIN"
                        rows, nbytes = await _relay(src, tgt, pair, out, params, into)
                    return rows, nbytes, True
                except psycopg.errors.UniqueViolation:
                    pass
            temp = await staging(tgt, pair, Side.TARGET)
            into = f"COPY {temp} ({pair.columns_list()}) FROM STDIN"
            _, nbytes = await _relay(src, tgt, pair, out, params, into)
            cur = await tgt.execute(
                f"INSERT INTO {target.qualified} ({pair.columns_list()})"
                f" SELECT {pair.columns_list()} FROM {temp}"
                f" ON CONFLICT ({ident(pair.key)}) DO NOTHING"
            )
            return cur.rowcount, nbytes, False


async def _relay(
    src: Conn, tgt: Conn, pair: Pair, out: str, params: list[Any], into: str
) -> tuple[int, int]:
    """Stream the source's COPY ``out`` into the target's COPY ``into``; (rows, bytes)."""
    nbytes = 0
    tcur = tgt.cursor()
    async with (
        src.cursor().copy(out, params) as reader,
        tcur.copy(into, writer=AsyncQueuedLibpqWriter(tcur)) as writer,
    ):
        async for block in reader:
            nbytes += len(block)
            await writer.write(block)
    return tcur.rowcount, nbytes


async def _settle(
    job: Job, pair: Pair, since: Any, options: BackfillOptions, run: int
) -> dict[str, Any]:
    """Compare every key the journal shows written since the backfill began; repair those
    that differ (a copy that resurrected a deleted row, or wrote under a newer one)."""
    written = await job.view.keys_since(since)
    keys = list(written.keys)
    job.progress.note(f"{pair.name}: settling {len(keys)} record(s) written during the copy")
    src, tgt = await paired(
        key_hashes(job.conns[Side.SOURCE], pair, Side.SOURCE, keys),
        key_hashes(job.conns[Side.TARGET], pair, Side.TARGET, keys),
    )
    differ = [k for k in keys if src.get(k) != tgt.get(k)]
    outcome, left, unsettled = await settle(
        job, pair, differ, options.verify, f"backfill run {run}"
    )
    return {
        "written": len(keys),
        "unknowable": written.unknowable,
        "differed": len(differ),
        **outcome.counts(),
        "still_differing": len(left),
        "unsettled": len(unsettled),
    }
