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
(``cutover/repair.py``, ``cutover/settling.py``). What a run is asked and reports:
``cutover/findings.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from bascule.checks import require_reason
from bascule.errors import Refused
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
from cutover.findings import KINDS, Options, TableReport, VerifyReport, other
from cutover.job import Job
from cutover.settling import recheck, settle
from cutover.tables import Pair, paired


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
    resumed = await job.runs.resumed("verify") if options.resume else None
    if resumed is not None:
        if resumed.mode != options.mode or resumed.authority != auth.value:
            raise Refused(
                f"{job.dataset}: run {resumed.id} was a {resumed.mode} verification against the "
                f"{resumed.authority}; this one would be {options.mode} against the "
                f"{auth.value}: run it without --resume"
            )
    written: set[Key] = set()
    if options.mode == "incremental":
        written = await _written_since_sweep(job)
    await job.begin()
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
    async with job.runs.stopping("verify", run, report):
        await _run(job, options, report, written)
    report.seconds = time.monotonic() - started
    await job.runs.finish("verify", run, report.status, report.figures(), error=report.error)
    return report


async def _run(job: Job, options: Options, report: VerifyReport, written: set[Key]) -> None:
    saved = await job.runs.checkpoints("verify", report.run)
    blind = 0
    for pair in job.pairs:
        table = TableReport(pair.name, pair.key, pair.schema)
        report.tables.append(table)
        if options.mode == "full":
            found = await _sweep(job, report.run, pair, saved.get(pair.name), report, table)
            # A row written while the sweep read may have moved into a block already read, on
            # both sides (an UPDATE writes a new version wherever there is room): neither
            # side's scan counted it, their figures agree, and a difference it carried in a
            # column the write left alone would go unseen. Every record written since the
            # sweep began is checked again by key.
            moved = await job.view.keys_since(report.swept_since)
            found = {**dict.fromkeys(moved.keys - set(found), (None, None)), **found}
            blind += moved.blind
        else:
            table.scanned = {s: len(written) for s in Side}
            src, tgt = await paired(
                key_hashes(job.conns[Side.SOURCE], pair, Side.SOURCE, written),
                key_hashes(job.conns[Side.TARGET], pair, Side.TARGET, written),
            )
            table.rows = {Side.SOURCE: len(src), Side.TARGET: len(tgt)}
            found = {k: (src.get(k), tgt.get(k)) for k in written if src.get(k) != tgt.get(k)}
        after = await job.view.high()
        divergent, unsettled = await recheck(job, pair, found, after, options)
        _classify(job, report, divergent)
        report.unsettled.update({k: job.view.token(k) for k in unsettled})
        if options.repair and divergent:
            await _repair(job, options, report, pair, set(divergent))
    if report.divergent:
        report.status = "divergent"
    elif blind:
        report.status = "failed"
        report.error = (
            f"{blind} dataset-wide write(s) (not creates) were made while the sweep read: any "
            "row they changed may have been read by neither side's scan, and the journal does "
            "not say which; run it again when no such write is in progress"
        )
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
            {"run": report.run, **{k: len(report.found[k]) for k in KINDS}},
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
    try:
        # Only if the side missed no write after this run began reading (checked on the
        # locked row: a write skipped meanwhile keeps the gap open).
        await controller.close_gap(
            job.store,
            job.dataset,
            side,
            actor=job.actor,
            reason=f"verified clean by bascule verify (run {report.run})",
            details={"run": report.run, "mode": report.mode},
            opened_before=report.swept_since,
        )
    except Refused as exc:
        return {**out, "detail": f"not closed: {exc}"}
    return {**out, "closed": True, "since": since.isoformat()}


async def _written_since_sweep(job: Job) -> set[Key]:
    """The keys written since the last full sweep; Refused when that set cannot be trusted:
    no full sweep yet, the last one not clean (what it found is not in the journal), made in
    a stage that writes one side (writes then were not journaled), journal entries purged
    since, writes since that were not journaled or whose records cannot be told."""
    name = job.dataset
    async with reaching_postgres():
        last = await job.store.pool.fetchrow(
            "SELECT id, status, stage, swept_since, now() - swept_since AS age"
            " FROM bascule_verify_run WHERE dataset = $1 AND mode = 'full'"
            " AND status IN ('clean', 'divergent') ORDER BY swept_since DESC LIMIT 1",
            name,
        )
    full = f"run a full sweep: `bascule verify {name}`"
    if last is None:
        raise Refused(f"{name}: no full verification yet to be incremental from; {full}")
    if last["status"] != "clean":
        raise Refused(
            f"{name}: the last full sweep (run {last['id']}) found the sides differ; an "
            f"incremental run checks only what was written since, not what it found; {full}"
        )
    if last["stage"] not in JOURNALED_STAGES:
        raise Refused(
            f"{name}: the last full sweep (run {last['id']}) was made in {last['stage']}, where "
            f"writes reach one side and are not journaled; {full}"
        )
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
