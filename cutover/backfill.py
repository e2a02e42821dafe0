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
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psycopg
from psycopg.copy import QueuedLibpqWriter

from bascule.errors import Refused
from bascule.stages import Side, Stage
from bascule.state import replicas
from cutover.checksum import Key, Range, key_hashes, predicate, thresholds
from cutover.findings import Options, VerifyReport
from cutover.job import Job
from cutover.settling import settle
from cutover.tables import Pair, SyncConn, blocking_reading, blocking_session, ident, paired
from cutover.verify import verify

BATCH_ROWS = 262144
"""Rows per batch: per transaction on the target and per checkpoint (about 40 MB of a
dcir-shaped table). A batch redone after an interruption costs at most this many rows again;
each batch also costs a commit and two queries to start (65,536-row batches copied 2M rows in
13 s on the 2-core bench machine, these in 10 s)."""


_RELAYED = 1 << 20
"""Bytes of COPY data relayed to the target per write."""


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
    resumed = await job.runs.resumed("backfill") if options.resume else None
    await job.begin()
    run, since = await job.runs.start_backfill(
        stage_version=stage.version, actor=job.actor, resumed=resumed
    )
    report = BackfillReport(run, name)
    async with job.runs.stopping("backfill", run, report):
        saved = await job.runs.checkpoints("backfill", run)
        for pair in job.pairs:
            report.tables.append(await _copy(job, run, pair, saved.get(pair.name), options))
        for pair in job.pairs:
            report.settled = await _settle(job, pair, since, options, run)
        job.progress.note(f"{name}: verifying")
        report.verification = await verify(job, options.verify, backfill_run=run)
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
    start: Key | None = position.get("next")
    starts: list[Key] | None = None
    if not pair.index_ordered(Side.SOURCE):
        # Keyset pages would each sort the rest of the table: cut it once instead.
        where = predicate(pair, [Range(start, None)])
        starts = await thresholds(
            job.conns[Side.SOURCE], pair, Side.SOURCE, options.batch_rows, where
        )
    estimate = pair.source.estimate
    job.progress.start("copy", estimate - found.rows if estimate > 0 else None)
    began = time.monotonic()
    loop = asyncio.get_running_loop()
    with (
        blocking_session(job.config, Side.SOURCE, "backfill") as src,
        blocking_session(job.config, Side.TARGET, "backfill", read_only=False) as tgt,
    ):
        while True:
            # Rows are relayed by a worker thread on blocking sessions: half the CPU per row
            # of an asynchronous COPY, on a machine whose cores the two servers need.
            step = partial(_step, src, tgt, pair, start, starts, options.batch_rows)
            work = loop.run_in_executor(None, step)
            try:
                end, rows, nbytes, direct = await asyncio.shield(work)
            except asyncio.CancelledError:
                await asyncio.wait([work])  # the batch in flight ends before its sessions do
                raise
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


def _step(
    src: SyncConn,
    tgt: SyncConn,
    pair: Pair,
    start: Key | None,
    starts: list[Key] | None,
    rows: int,
) -> tuple[Key | None, int, int, bool]:
    """One batch, from ``start``: (the next batch's first key or None, rows written, bytes
    streamed, whether it went straight in). In a worker thread."""
    if starts is not None:
        end = starts.pop(0) if starts else None
    else:
        end = _next_start(src, pair, start, rows)
    return (end, *_batch(src, tgt, pair, Range(start, end)))


def _next_start(src: SyncConn, pair: Pair, start: Key | None, rows: int) -> Key | None:
    """The first key of the batch after the one starting at ``start`` (None: it is the last)."""
    where, params = predicate(pair, [Range(start, None)])
    table = pair.source
    with blocking_reading(table.backend, f"paging through {table.qualified}"):
        row = src.execute(
            f"SELECT t.{ident(pair.key)}::text FROM {table.qualified} t WHERE {where}"
            f" ORDER BY {pair.key_order()} OFFSET {int(rows)} LIMIT 1",
            params,
        ).fetchone()
    return None if row is None else str(row[0])


def empty(tgt: SyncConn, pair: Pair, where: str, params: list[Any]) -> bool:
    """Does the target hold no row in the batch's range? (Only asked where its key index
    serves the range: elsewhere every batch is staged.)"""
    if not pair.index_ordered(Side.TARGET):
        return False
    row = tgt.execute(
        f"SELECT NOT EXISTS (SELECT 1 FROM {pair.target.qualified} t WHERE {where})", params
    ).fetchone()
    return bool(row and row[0])


def _batch(src: SyncConn, tgt: SyncConn, pair: Pair, batch: Range) -> tuple[int, int, bool]:
    """Copy one batch; (rows written, bytes streamed, whether it went straight in)."""
    where, params = predicate(pair, [batch])
    # The columns the target is written (its generated ones are its own to compute).
    columns = pair.columns_list(Side.TARGET)
    out = (
        f"COPY (SELECT {pair.columns_list(Side.TARGET, 't')} FROM {pair.source.qualified} t"
        f" WHERE {where} ORDER BY {pair.key_order()}) TO STDOUT"
    )
    target = pair.target
    both = f"{pair.source.backend} -> {target.backend}"
    with blocking_reading(both, f"backfilling {target.qualified}"), tgt.transaction():
        if empty(tgt, pair, where, params):
            try:
                with tgt.transaction():  # a savepoint: a replay may land in the range first
                    # COPY writes identity columns as given, GENERATED ALWAYS or not.
                    into = f"COPY {target.qualified} ({columns}) FROM STDIN"
                    rows, nbytes = _relay(src, tgt, out, params, into)
                return rows, nbytes, True
            except psycopg.errors.UniqueViolation:
                pass
        temp = f"bascule_rows_{target.oid}"
        tgt.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {temp} AS"
            f" SELECT {columns} FROM {target.qualified} WITH NO DATA"
        )
        tgt.execute(f"TRUNCATE {temp}")
        _, nbytes = _relay(src, tgt, out, params, f"COPY {temp} ({columns}) FROM STDIN")
        cur = tgt.execute(
            f"INSERT INTO {target.qualified} ({columns}){pair.overriding(Side.TARGET)}"
            f" SELECT {columns} FROM {temp} ON CONFLICT ({ident(pair.key)}) DO NOTHING"
        )
        return cur.rowcount, nbytes, False


def _relay(src: SyncConn, tgt: SyncConn, out: str, params: list[Any], into: str) -> tuple[int, int]:
    """Stream the source's COPY ``out`` into the target's COPY ``into``; (rows, bytes)."""
    nbytes = 0
    tcur = tgt.cursor()
    pending = bytearray()
    # The source hands out one row per message: relayed a megabyte at a time, through a
    # writer thread, so the target's session is fed while the next rows are read.
    with (
        src.cursor().copy(out, params) as reader,
        tcur.copy(into, writer=QueuedLibpqWriter(tcur)) as writer,
    ):
        for block in reader:
            pending += block
            if len(pending) >= _RELAYED:
                nbytes += len(pending)
                writer.write(bytes(pending))
                pending.clear()
        if pending:
            nbytes += len(pending)
            writer.write(bytes(pending))
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
