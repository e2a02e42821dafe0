"""Stored-data verification: are the two backends' tables of a dataset the same, row for row?

``bascule verify DATASET`` (docs/architecture.md). A *full* sweep finds chunk boundaries on one
side, has both sides checksum every chunk inside Postgres at once (``cutover/checksum.py``),
narrows the chunks that differ down to keys, and checks those keys again until quiet: a key
that differs only because a write through the proxy is still on its way (the source has it,
its replay to the target is pending) is not a divergence. An *incremental* run checks only the
keys the journal shows written since the last clean full sweep.

What is found is reported relative to the authority of the dataset's stage: *missing* (on the
authority, absent from the verified side), *extra* (on the verified side only), *changed*; as
record tokens (the proxy's ``Namer`` tokens), never values. Schema differences are reported as
such, and rows compared on the columns both sides share with the same type.

A run is recorded (``bascule_verify_run``) clean or not, checkpointed per table so ``--resume``
continues it, and a clean full run closes the verified side's gap if that gap was open before
the run began reading. ``--repair`` writes the authority's rows onto the other side
(``cutover/repair.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from bascule.checks import require_reason
from bascule.errors import BasculeError, Refused
from bascule.stages import Side, authority, when
from bascule.state import audit
from bascule.state.journal.entries import JOURNALED_STAGES
from bascule.state.postgres import reaching_postgres
from cutover import controller
from cutover.checksum import (
    CHUNK_ROWS,
    Compared,
    Figures,
    Key,
    differing,
    integer_thresholds,
    key_hashes,
    narrow,
    scan,
    thresholds,
)
from cutover.job import Job
from cutover.repair import Outcome, Repairer
from cutover.tables import Pair, SchemaDiff, paired

Mode = Literal["full", "incremental"]
_KINDS = ("missing", "extra", "changed")
_SHOWN_TOKENS = 1000
"""Tokens kept per kind in a run's figures (counts are always whole)."""


@dataclass(frozen=True)
class Options:
    mode: Mode = "full"
    resume: bool = False
    repair: bool = False
    show_keys: bool = False
    reason: str | None = None
    drain_wait: float = 30.0
    """Seconds a re-check round waits for the open writes of the records it checks."""
    settle_for: float = 120.0
    """Seconds keys that differ are checked again, at most, before they are called unsettled."""


@dataclass
class TableReport:
    table: str
    key: str
    schema: SchemaDiff
    chunks: int = 0
    differing_chunks: int = 0
    rows: dict[Side, int] = field(default_factory=dict)
    """Rows each side holds (as its scan counted them)."""
    scanned: dict[Side, int] = field(default_factory=dict)
    """Rows scanned by this run (a resumed run scans only what was left)."""
    seconds: dict[Side, float] = field(default_factory=dict)

    def rate(self, side: Side) -> float:
        seconds = self.seconds.get(side, 0.0)
        return self.scanned.get(side, 0) / seconds if seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "key": self.key,
            "chunks": self.chunks,
            "differing_chunks": self.differing_chunks,
            "rows": {s.value: self.rows.get(s, 0) for s in Side},
            "rows_per_second": {s.value: round(self.rate(s)) for s in Side},
            "schema": self.schema.as_json(),
        }


@dataclass
class VerifyReport:
    run: int
    dataset: str
    mode: Mode
    stage: str
    authority: Side
    verified: Side
    swept_since: datetime
    status: str = "running"
    error: str | None = None
    tables: list[TableReport] = field(default_factory=list)
    found: dict[str, dict[Key, str]] = field(default_factory=lambda: {k: {} for k in _KINDS})
    """Kind -> key -> token. Keys stay in memory: shown only with ``--show-keys``."""
    unsettled: dict[Key, str] = field(default_factory=dict)
    repair: dict[str, Any] | None = None
    repaired_all: bool = False
    gap: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    show_keys: bool = False

    @property
    def schema_differs(self) -> bool:
        return any(not t.schema.empty for t in self.tables)

    @property
    def divergent(self) -> bool:
        return self.schema_differs or any(self.found[k] for k in _KINDS)

    @property
    def exit_code(self) -> int:
        """0 clean (or every difference repaired), 4 divergent, 1 could not conclude."""
        if self.status == "clean":
            return 0
        if self.status == "divergent":
            return 0 if self.repaired_all and not self.schema_differs else 4
        return 1

    def figures(self) -> dict[str, Any]:
        """What the run row keeps: counts, rates and tokens, never a key."""
        out: dict[str, Any] = {
            "tables": [t.as_json() for t in self.tables],
            "seconds": round(self.seconds, 3),
            "gap": self.gap,
        }
        for kind in _KINDS:
            tokens = sorted(self.found[kind].values())
            out[kind] = {"count": len(tokens), "tokens": tokens[:_SHOWN_TOKENS]}
        tokens = sorted(self.unsettled.values())
        out["unsettled"] = {"count": len(tokens), "tokens": tokens[:_SHOWN_TOKENS]}
        if self.repair is not None:
            out["repair"] = self.repair
        return out

    def as_json(self) -> dict[str, Any]:
        out = {
            "run": self.run,
            "dataset": self.dataset,
            "mode": self.mode,
            "status": self.status,
            "stage": self.stage,
            "authority": self.authority.value,
            "verified": self.verified.value,
            "swept_since": self.swept_since.isoformat(),
            **self.figures(),
        }
        if self.error:
            out["error"] = self.error
        if self.show_keys:
            out["keys"] = {kind: sorted(self.found[kind]) for kind in _KINDS} | {
                "unsettled": sorted(self.unsettled)
            }
        return out


def other(side: Side) -> Side:
    return Side.TARGET if side is Side.SOURCE else Side.SOURCE


async def verify(job: Job, options: Options, *, backfill_run: int | None = None) -> VerifyReport:
    """Verify ``job``'s dataset; record the run; close the verified side's gap when clean."""
    if options.show_keys or options.repair:
        require_reason(options.reason)
    started = time.monotonic()
    stage = await job.store.get(job.dataset)
    auth = authority(stage.stage)
    if options.repair and stage.stage.value not in JOURNALED_STAGES:
        raise Refused(
            f"{job.dataset}: cannot repair in {stage.stage.value}: writes reach one side only "
            "there, so a repaired record would not stay repaired; repair in a stage that "
            "writes both sides"
        )
    resumed = None
    if options.resume:
        resumed = await job.runs.resumable("verify")
        if resumed is None:
            raise Refused(
                f"{job.dataset}: no interrupted verification to resume (the latest finished); "
                "run it without --resume"
            )
        if resumed.mode != options.mode or resumed.authority != auth.value:
            raise Refused(
                f"{job.dataset}: run {resumed.id} was a {resumed.mode} verification against the "
                f"{resumed.authority}; this one would be {options.mode} against the "
                f"{auth.value}: run it without --resume"
            )
    written: set[Key] = set()
    if options.mode == "incremental":
        written = await _written_since_sweep(job)
    run, swept_since = await job.runs.start_verify(
        mode=options.mode,
        verified=other(auth).value,
        authority=auth.value,
        stage=stage.stage.value,
        stage_version=stage.version,
        actor=job.actor,
        resumed=resumed,
        backfill_run=backfill_run,
    )
    report = VerifyReport(
        run,
        job.dataset,
        options.mode,
        stage.stage.value,
        auth,
        other(auth),
        swept_since,
        show_keys=options.show_keys,
    )
    try:
        await _run(job, options, report, written)
    except BaseException as exc:
        interrupted = isinstance(exc, asyncio.CancelledError | KeyboardInterrupt)
        report.status = "interrupted" if interrupted else "failed"
        report.seconds = time.monotonic() - started
        with contextlib.suppress(Exception):
            await job.runs.finish(
                "verify", run, report.status, report.figures(), error=describe(exc)
            )
        raise
    report.seconds = time.monotonic() - started
    await job.runs.finish("verify", run, report.status, report.figures(), error=report.error)
    return report


def describe(exc: BaseException) -> str:
    """What stopped a run, for its row: our own errors say it without values; anything else
    only by its class (a library's message may quote a row)."""
    if isinstance(exc, BasculeError):
        return str(exc)[:500]
    return type(exc).__name__


async def _run(job: Job, options: Options, report: VerifyReport, written: set[Key]) -> None:
    saved = await job.runs.checkpoints("verify", report.run)
    for pair in job.pairs:
        table = TableReport(pair.name, pair.key, pair.schema)
        report.tables.append(table)
        if options.mode == "full":
            found = await _sweep(job, report.run, pair, saved.get(pair.name), report, table)
        else:
            table.scanned = {s: len(written) for s in Side}
            src, tgt = await paired(
                key_hashes(job.conns[Side.SOURCE], pair, Side.SOURCE, written),
                key_hashes(job.conns[Side.TARGET], pair, Side.TARGET, written),
            )
            table.rows = {Side.SOURCE: len(src), Side.TARGET: len(tgt)}
            found = {k: (src.get(k), tgt.get(k)) for k in written if src.get(k) != tgt.get(k)}
        after = await job.view.high()
        divergent, unsettled = await _recheck(job, pair, found, after, options)
        _classify(job, report, divergent)
        report.unsettled.update({k: job.view.token(k) for k in unsettled})
        if options.repair and divergent:
            await _repair(job, options, report, pair, set(divergent))
    if report.divergent:
        report.status = "divergent"
    elif report.unsettled:
        report.status = "failed"
        report.error = (
            f"{len(report.unsettled)} record(s) still differ and writes to them are still open "
            "in the journal (dead or stuck replays: see `bascule journal status`); nothing can "
            "be concluded about them yet"
        )
    else:
        report.status = "clean"
        if options.mode == "full":
            report.gap = await _close_gap(job, report)
        else:
            report.gap = {
                "side": report.verified.value,
                "closed": False,
                "detail": "an incremental run does not close gaps (writes made while a side "
                "was not written are not in the journal): a full sweep does",
            }
    if options.show_keys:
        await _audit(
            job,
            "verify-show-keys",
            options.reason,
            {"run": report.run, **{k: len(report.found[k]) for k in _KINDS}},
        )


def _classify(job: Job, report: VerifyReport, divergent: Compared) -> None:
    auth = report.authority
    for key, (src, tgt) in divergent.items():
        theirs, ours = (src, tgt) if auth is Side.SOURCE else (tgt, src)
        kind = "missing" if ours is None else "extra" if theirs is None else "changed"
        report.found[kind][key] = job.view.token(key)


async def _sweep(
    job: Job,
    run: int,
    pair: Pair,
    saved: Mapping[str, Any] | None,
    report: VerifyReport,
    table: TableReport,
) -> Compared:
    """Chunk, scan both sides at once, and narrow what differs: the keys whose rows differ."""
    state: dict[str, Any] = dict(saved["position"]) if saved and saved.get("position") else {}
    if saved and saved.get("done"):
        table.rows = {s: state["rows"][s.value] for s in Side}
        table.chunks, table.differing_chunks = state["chunks"], state["differing"]
        return {k: (v[0], v[1]) for k, v in state["found"].items()}
    progress = job.progress
    if "bounds" not in state:
        found_bounds = await integer_thresholds(job.conns, pair) if pair.integer_key else None
        if found_bounds is None:
            # Streamed from a side whose key index serves the order, with more of the table
            # (the authority's, normally).
            leader = max(
                Side,
                key=lambda s: (pair.index_ordered(s), pair.side(s).pages, s is report.authority),
            )
            progress.start("chunks", _estimate(pair, leader))
            found_bounds = await thresholds(
                job.conns[leader],
                pair,
                leader,
                CHUNK_ROWS,
                on_rows=lambda n: progress.advance("chunks", n),
            )
            progress.done("chunks")
        bounds = found_bounds
        state = {"bounds": bounds, "sides": {}}
        await job.runs.checkpoint("verify", run, pair.name, state)
    bounds = state["bounds"]
    table.chunks = len(bounds) + 1
    figures: dict[Side, dict[int, Figures]] = {}
    nexts: dict[Side, int] = {}
    for side in Side:
        saved_side = state["sides"].get(side.value, {})
        nexts[side] = saved_side.get("next", 0)
        figures[side] = {int(c): Figures(*v) for c, v in saved_side.get("figures", {}).items()}
        table.scanned[side] = 0

    def snapshot(done: bool = False) -> dict[str, Any]:
        return {
            "bounds": bounds,
            "sides": {
                s.value: {
                    "next": nexts[s],
                    "figures": {str(c): f.as_list() for c, f in figures[s].items()},
                }
                for s in Side
            },
        }

    last_saved = time.monotonic()

    async def scanned(side: Side, block: int, found: dict[int, Figures]) -> None:
        nonlocal last_saved
        for chunk, f in found.items():
            figures[side][chunk] = figures[side].get(chunk, Figures()) + f
        nexts[side] = block
        rows = sum(f.count for f in found.values())
        table.scanned[side] += rows
        progress.advance(side.value, rows)
        if time.monotonic() - last_saved >= 2.0:
            last_saved = time.monotonic()
            await job.runs.checkpoint(
                "verify",
                run,
                pair.name,
                snapshot(),
                figures={"scanned": {s.value: table.scanned[s] for s in Side}},
            )

    async def side_scan(side: Side) -> None:
        progress.start(side.value, _estimate(pair, side))
        started = time.monotonic()
        await scan(
            job.conns[side],
            pair,
            side,
            bounds,
            nexts[side],
            lambda block, found: scanned(side, block, found),
        )
        table.seconds[side] = time.monotonic() - started
        progress.done(side.value)

    try:
        await paired(side_scan(Side.SOURCE), side_scan(Side.TARGET))
    except BaseException:
        # Stopped (Ctrl-C, a failure on one side): keep what both sides have summed so far.
        with contextlib.suppress(Exception):
            await asyncio.shield(job.runs.checkpoint("verify", run, pair.name, snapshot()))
        raise
    table.rows = {s: sum(f.count for f in figures[s].values()) for s in Side}
    diffs = differing(bounds, figures)
    table.differing_chunks = len(diffs)
    if diffs:
        progress.note(f"{pair.name}: {len(diffs)} chunk(s) differ; narrowing them to records")
    found = await narrow(job.conns, pair, diffs, bounds)
    done = {
        "rows": {s.value: table.rows[s] for s in Side},
        "chunks": table.chunks,
        "differing": table.differing_chunks,
        "found": {k: list(v) for k, v in found.items()},
    }
    await job.runs.checkpoint(
        "verify",
        run,
        pair.name,
        done,
        done=True,
        figures={"rows": done["rows"], "chunks": table.chunks},
    )
    return found


def _estimate(pair: Pair, side: Side) -> int | None:
    estimate = pair.side(side).estimate
    return estimate if estimate > 0 else None


async def _recheck(
    job: Job, pair: Pair, found: Mapping[Key, Any], after: int, options: Options
) -> tuple[Compared, Compared]:
    """Check the keys ``found`` again until quiet: (divergent, unsettled).

    ``after``: the journal's highest sequence once the rows that differed had been read. Each
    round reads the keys' rows again (noting the state database's time first, and the highest
    sequence after) and calls a key divergent when it still differs though no write can
    explain it: no entry of its record after ``after``, none still open, none settled since
    this read began (a write whose intent was not visible yet when ``after`` was read), and no
    dataset-wide write whose records cannot be told. Any write to the record is then either in
    both sides' rows read, or not yet sent. The other keys wait for their records' open writes
    to settle (bounded by ``drain_wait``), and go round again until ``settle_for``; what still
    differs then, with writes open, is unsettled."""
    pending = set(found)
    final: Compared = {}
    last: Compared = {}
    deadline = time.monotonic() + options.settle_for
    if pending:
        job.progress.note(f"{pair.name}: checking {len(pending)} record(s) again until quiet")
    while pending:
        reading_from = await job.runs.now()
        src, tgt = await paired(
            key_hashes(job.conns[Side.SOURCE], pair, Side.SOURCE, pending),
            key_hashes(job.conns[Side.TARGET], pair, Side.TARGET, pending),
        )
        newest = await job.view.high()
        now: Compared = {k: (src.get(k), tgt.get(k)) for k in pending if src.get(k) != tgt.get(k)}
        tokens = {job.view.token(k): k for k in now}
        touched = await job.view.touched(tokens, after, settled_since=reading_from)
        for token, key in tokens.items():
            if token not in touched:
                final[key] = now[key]
        last = {k: v for k, v in now.items() if k not in final}
        pending = set(last)
        after = newest
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        waiting = {job.view.token(k) for k in pending}
        await job.view.quiet(waiting, within=min(options.drain_wait, left))
    return final, last


async def _repair(
    job: Job, options: Options, report: VerifyReport, pair: Pair, keys: set[Key]
) -> None:
    job.progress.note(f"{pair.name}: repairing {len(keys)} record(s)")
    outcome, left, unsettled = await settle(job, pair, keys, options, f"verify run {report.run}")
    report.repair = {
        **outcome.counts(),
        "still_differing": len(left),
        "unsettled": len(unsettled),
    }
    report.repaired_all = not left and not unsettled
    report.unsettled.update({k: job.view.token(k) for k in unsettled})
    await _audit(job, "verify-repair", options.reason, {"run": report.run, **report.repair})


async def settle(
    job: Job, pair: Pair, keys: Collection[Key], options: Options, who: str
) -> tuple[Outcome, set[Key], Compared]:
    """Make ``keys``' rows on the verified side the authority's (``cutover/repair.py``) and
    check them again; a record skipped for an open write is repaired once that write has
    landed if it still differs. Up to three rounds. (What was done, keys still differing,
    keys unsettled.)"""
    outcome = Outcome()
    left: Collection[Key] = keys
    unsettled: Compared = {}
    async with Repairer(job.config, job.journal, job.view, pair, job.conns, who) as repairer:
        for _ in range(3):
            await repairer.repair(left, outcome)
            after = await job.view.high()
            again, unsettled = await _recheck(job, pair, dict.fromkeys(left), after, options)
            left = set(again)
            if not left:
                break
    return outcome, set(left), unsettled


async def _audit(job: Job, action: str, reason: str | None, details: dict[str, Any]) -> None:
    async with reaching_postgres(), job.store.pool.acquire() as conn:
        await audit.record(
            conn,
            job.dataset,
            action,
            actor=job.actor,
            reason=require_reason(reason),
            details=details,
        )


async def _close_gap(job: Job, report: VerifyReport) -> dict[str, Any]:
    """Close the verified side's gap if it was open before this run began reading."""
    side = report.verified
    row = await job.store.get(job.dataset)
    since = row.gaps.get(side)
    out: dict[str, Any] = {"side": side.value, "closed": False}
    if since is None:
        return {**out, "detail": f"the {side.value} has no open gap"}
    if since > report.swept_since:
        return {
            **out,
            "detail": f"the {side.value}'s gap opened at {when(since)}, after this run began "
            f"reading at {when(report.swept_since)}: it may have missed writes this run did "
            "not see; not closed",
        }
    try:
        await controller.close_gap(
            job.store,
            job.dataset,
            side,
            actor=job.actor,
            reason=f"verified clean by bascule verify (run {report.run})",
            details={"run": report.run, "mode": report.mode},
        )
    except Refused as exc:
        return {**out, "detail": f"not closed: {exc}"}
    return {**out, "closed": True, "since": since.isoformat()}


async def _written_since_sweep(job: Job) -> set[Key]:
    """The keys written since the last clean full sweep; Refused when that set cannot be
    trusted (no sweep yet, journal entries purged since, writes that were not journaled,
    writes whose records cannot be told)."""
    name = job.dataset
    async with reaching_postgres():
        last = await job.store.pool.fetchrow(
            "SELECT id, swept_since, now() - swept_since AS age FROM bascule_verify_run"
            " WHERE dataset = $1 AND status = 'clean' AND mode = 'full'"
            " ORDER BY swept_since DESC LIMIT 1",
            name,
        )
    full = f"run a full sweep: `bascule verify {name}`"
    if last is None:
        raise Refused(f"{name}: no clean full verification yet to be incremental from; {full}")
    since: datetime = last["swept_since"]
    if last["age"].total_seconds() >= job.config.state.journal_retention:
        raise Refused(
            f"{name}: the last clean full sweep (run {last['id']}) began at {when(since)}, "
            f"longer ago than the journal keeps settled entries ([state] journal_retention): "
            f"writes since may have been purged; {full}"
        )
    async with reaching_postgres():
        unjournaled = await job.store.pool.fetch(
            "SELECT DISTINCT to_stage FROM bascule_audit WHERE dataset = $1 AND at >= $2"
            " AND to_stage IS NOT NULL AND NOT (to_stage = ANY($3::text[]))",
            name,
            since,
            list(JOURNALED_STAGES),
        )
    stage = await job.store.get(name)
    stages = {r["to_stage"] for r in unjournaled}
    if stage.stage.value not in JOURNALED_STAGES:
        stages.add(stage.stage.value)
    if stages:
        raise Refused(
            f"{name}: since the last clean full sweep the dataset was in "
            f"{', '.join(sorted(stages))}, where writes reach one side and are not journaled; "
            f"{full}"
        )
    written = await job.view.keys_since(since)
    if written.unknowable:
        raise Refused(
            f"{name}: {written.unknowable} write(s) since the last clean full sweep name no "
            "record the journal can tell (dataset-wide writes, or creates whose answer is "
            f"unknown); {full}"
        )
    return written.keys
