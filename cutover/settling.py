"""Differences checked again until quiet, and repaired records checked again.

A key found differing may be a write on its way (the authority has it, its replay to the other
side is pending): :func:`recheck` reads it again until no write can explain what differs, and
calls only that a divergence. :func:`settle` repairs keys (``cutover/repair.py``) and checks them
again, for ``verify --repair`` and a backfill's end.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import Any

from bascule.stages import Side
from cutover.checksum import Compared, Key, key_hashes
from cutover.findings import Options
from cutover.job import Job
from cutover.repair import Outcome, Repairer
from cutover.tables import Pair, paired


async def recheck(
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
            again, unsettled = await recheck(job, pair, dict.fromkeys(left), after, options)
            left = set(again)
            if not left:
                break
    return outcome, set(left), unsettled
