"""SRE commands on stored data: ``bascule verify`` and ``bascule backfill``.

Both read the backends' own databases (``[backends.X] database``) and bascule's state database;
neither needs a proxy. Exit codes as the other commands (0 done or clean, 1 error, 2 bad usage,
3 refused: nothing changed), and 4 for a verification that found the sides differ. Progress is
a bar (rows, rows/s or MB/s, ETA) on a terminal, plain lines otherwise, nothing with ``--json``;
it goes to stderr, the result to stdout. Records are shown as tokens; ``--show-keys`` shows
their keys, for an operator with a reason, audited before anything is shown.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from bascule.app import render
from bascule.app.cli import os_user, run, with_config
from bascule.app.clients import config_of
from bascule.checks import check_actor, require_reason
from bascule.config import Config, Secrets
from bascule.errors import StoreError, UsageError
from bascule.state.servers import LOCAL_POSTGRES_URL, port_answers
from cutover.backfill import BATCH_ROWS, BackfillOptions, BackfillReport, backfill
from cutover.findings import Options, VerifyReport
from cutover.job import Job, Silent, data_job
from cutover.job import Progress as JobProgress
from cutover.verify import verify

T = TypeVar("T")

_LABELS = {
    "chunks": "finding chunks",
    "source": "source",
    "target": "target",
    "copy": "copying",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``verify`` and ``backfill`` to the ``bascule`` command."""
    common = argparse.ArgumentParser(add_help=False, parents=[with_config()])
    common.add_argument("--by", default=os_user(), help="who (default: the OS user)")
    common.add_argument("--resume", action="store_true", help="continue the latest interrupted run")

    p = sub.add_parser(
        "verify",
        parents=[common],
        help="compare a dataset's rows in the two backends' databases (exit 4 if they differ)",
    )
    p.add_argument("dataset")
    p.add_argument(
        "--incremental",
        action="store_true",
        help="check only the records the journal shows written since the last clean full sweep",
    )
    p.add_argument(
        "--show-keys",
        action="store_true",
        help="show the differing records' keys, not only their tokens (needs --reason; audited)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="write the authoritative side's rows over the differing ones (needs --reason; "
        "audited, each record under its write lock)",
    )
    p.add_argument("--reason", help="why (required with --show-keys and --repair; audited)")
    p.set_defaults(func=lambda a: run(_verify(a)))

    p = sub.add_parser(
        "backfill",
        parents=[common],
        help="copy the source's rows into the target's database (dualwrite only), then verify",
    )
    p.add_argument("dataset")
    p.add_argument(
        "--batch-rows",
        type=int,
        default=BATCH_ROWS,
        help=f"rows per transaction on the target and per checkpoint (default {BATCH_ROWS:,})",
    )
    p.set_defaults(func=lambda a: run(_backfill(a)))


def _state_database(config: Config) -> str:
    """The state Postgres, found as the other commands find it (the environment, the
    configuration, then one answering locally); Redis is not needed here."""
    url = os.environ.get("BASCULE_POSTGRES_URL") or config.state.postgres_url
    if url:
        return url
    if port_answers("127.0.0.1", 5432):
        return LOCAL_POSTGRES_URL
    raise StoreError(
        "no state Postgres: set BASCULE_POSTGRES_URL or [state] postgres_url, or run one on "
        "127.0.0.1:5432"
    )


async def _verify(args: argparse.Namespace) -> int:
    if (args.show_keys or args.repair) and not (args.reason and args.reason.strip()):
        flags = [f for f, on in (("--show-keys", args.show_keys), ("--repair", args.repair)) if on]
        raise UsageError(
            f"{' and '.join(flags)} needs a reason (--reason TEXT): it goes into the audit trail"
        )
    reason = require_reason(args.reason) if args.reason is not None else None
    check_actor(args.by)
    options = Options(
        mode="incremental" if args.incremental else "full",
        resume=args.resume,
        repair=args.repair,
        show_keys=args.show_keys,
        reason=reason,
    )
    report = await _job(args, "verify", lambda job: verify(job, options))
    if args.json:
        render.print_json(report.as_json())
    else:
        _show_verification(report)
    return report.exit_code


async def _job(args: argparse.Namespace, purpose: str, work: Callable[[Job], Awaitable[T]]) -> T:
    """Run one data job on the dataset ``args`` names, with its progress shown as it goes."""
    config = config_of(args)
    progress = _progress(args.json)
    async with data_job(
        config,
        Secrets.from_env(os.environ),
        args.dataset,
        _state_database(config),
        actor=args.by,
        purpose=purpose,
        progress=progress,
    ) as job:
        try:
            return await work(job)
        finally:
            _stop(progress)


async def _backfill(args: argparse.Namespace) -> int:
    check_actor(args.by)
    if args.batch_rows < 1:
        raise UsageError("--batch-rows must be at least 1")
    options = BackfillOptions(resume=args.resume, batch_rows=args.batch_rows)
    report = await _job(args, "backfill", lambda job: backfill(job, options))
    if args.json:
        render.print_json(report.as_json())
    else:
        _show_backfill(report)
    return report.exit_code


# --- progress ---------------------------------------------------------------------------


def _progress(as_json: bool) -> JobProgress:
    if as_json:
        return Silent()
    if sys.stderr.isatty():
        return Bars()
    return Lines(sys.stderr)


def _stop(progress: JobProgress) -> None:
    if isinstance(progress, Bars):
        progress.stop()


class _Rate(ProgressColumn):
    """Rows per second, and MB per second when the task counts bytes."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("")
        text = f"{task.completed / elapsed:,.0f} rows/s"
        nbytes = task.fields.get("nbytes", 0)
        if nbytes:
            text += f", {nbytes / elapsed / 1e6:,.1f} MB/s"
        return Text(text)


class _Rows(ProgressColumn):
    def render(self, task: Task) -> Text:
        total = f"/{task.total:,.0f}" if task.total is not None else ""
        return Text(f"{task.completed:,.0f}{total} rows")


class Bars:
    """rich progress bars on a terminal (stderr)."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            _Rows(),
            _Rate(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self.progress.start()
        self.tasks: dict[str, Any] = {}

    def start(self, task: str, total: int | None, unit: str = "rows") -> None:
        self.tasks[task] = self.progress.add_task(_LABELS.get(task, task), total=total, nbytes=0)

    def advance(self, task: str, rows: int, nbytes: int = 0) -> None:
        found = self.tasks.get(task)
        if found is None:
            return
        current = self.progress.tasks[found] if found < len(self.progress.tasks) else None
        total_bytes = (current.fields.get("nbytes", 0) if current else 0) + nbytes
        self.progress.update(found, advance=rows, nbytes=total_bytes)
        if current is not None and current.total is not None and current.completed > current.total:
            self.progress.update(found, total=current.completed)  # the estimate was low

    def done(self, task: str) -> None:
        found = self.tasks.get(task)
        if found is not None:
            current = self.progress.tasks[found]
            self.progress.update(found, total=current.completed)

    def note(self, text: str) -> None:
        self.progress.console.print(Text(text))

    def stop(self) -> None:
        self.progress.stop()


class Lines:
    """Plain progress lines (not a terminal): a line at each start, every few seconds, and at
    each end."""

    def __init__(self, out: TextIO, every: float = 5.0) -> None:
        self.out = out
        self.every = every
        self.state: dict[str, list[float]] = {}
        """task -> [started, rows, bytes, last printed, total or -1]."""

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def start(self, task: str, total: int | None, unit: str = "rows") -> None:
        now = time.monotonic()
        self.state[task] = [now, 0, 0, now, -1 if total is None else total]
        about = f" (about {total:,} rows)" if total else ""
        self._say(f"{_LABELS.get(task, task)}: started{about}")

    def advance(self, task: str, rows: int, nbytes: int = 0) -> None:
        state = self.state.get(task)
        if state is None:
            return
        state[1] += rows
        state[2] += nbytes
        now = time.monotonic()
        if now - state[3] >= self.every:
            state[3] = now
            self._say(f"{_LABELS.get(task, task)}: {self._figures(state, now)}")

    def _figures(self, state: list[float], now: float) -> str:
        started, rows, nbytes, _, total = state
        elapsed = max(now - started, 1e-9)
        text = f"{rows:,.0f} rows"
        if total > 0:
            text += f" ({min(rows / total, 1):.0%})"
        text += f", {rows / elapsed:,.0f} rows/s"
        if nbytes:
            text += f", {nbytes / elapsed / 1e6:,.1f} MB/s"
        if total > rows and rows:
            text += f", about {(total - rows) / (rows / elapsed):,.0f} s left"
        return text

    def done(self, task: str) -> None:
        state = self.state.pop(task, None)
        if state is not None:
            now = time.monotonic()
            self._say(
                f"{_LABELS.get(task, task)}: done, {self._figures([*state[:4], -1], now)} "
                f"in {now - state[0]:.1f} s"
            )

    def note(self, text: str) -> None:
        self._say(text)


# --- results ----------------------------------------------------------------------------


def _show_verification(report: VerifyReport) -> None:
    console = render.console()
    headline = {
        "clean": "clean",
        "divergent": "DIVERGENT, then repaired" if report.repaired_all else "DIVERGENT",
        "failed": "could not conclude",
    }.get(report.status, report.status)
    console.print(
        Text(
            f"{report.dataset}: {headline} (run {report.run}, {report.mode}, in {report.stage}: "
            f"the {report.verified.value} checked against the {report.authority.value}, "
            f"{report.seconds:.1f} s)"
        )
    )
    for table in report.tables:
        figures = table.as_json()
        rows, rates = figures["rows"], figures["rows_per_second"]
        console.print(
            Text(
                f"  {table.table} (key {table.key}): {rows['source']:,} rows on the source, "
                f"{rows['target']:,} on the target; {table.chunks} chunks, "
                f"{table.differing_chunks} differed; {rates['source']:,} and "
                f"{rates['target']:,} rows/s"
            )
        )
        schema = table.schema
        for column in schema.only_source:
            console.print(Text(f"  schema: column {column} is on the source only"))
        for column in schema.only_target:
            console.print(Text(f"  schema: column {column} is on the target only"))
        for column, was, now in schema.type_changed:
            console.print(
                Text(f"  schema: column {column} is {was} on the source, {now} on the target")
            )
    auth, mine = report.authority.value, report.verified.value
    words = {
        "missing": f"on the {auth} only (missing from the {mine})",
        "extra": f"on the {mine} only",
        "changed": "different on each side",
    }
    for kind in ("missing", "extra", "changed"):
        if report.found[kind]:
            console.print(Text(f"  {len(report.found[kind]):,} record(s) {words[kind]}"))
    if report.unsettled:
        console.print(
            Text(f"  {len(report.unsettled):,} record(s) still differ with their writes open")
        )
    rows = [
        (kind, key, token)
        for kind in ("missing", "extra", "changed")
        for key, token in sorted(report.found[kind].items(), key=lambda kv: kv[1])
    ] + [("unsettled", key, token) for key, token in sorted(report.unsettled.items())]
    if rows:
        shown = Table(title="records" + (" (keys shown: audited)" if report.show_keys else ""))
        shown.add_column("kind")
        if report.show_keys:
            shown.add_column("key")
        shown.add_column("token")
        for kind, key, token in rows[:200]:
            cells = [kind, key, token] if report.show_keys else [kind, token]
            shown.add_row(*(Text(c) for c in cells))
        console.print(shown)
        if len(rows) > 200:
            console.print(Text(f"  ... and {len(rows) - 200:,} more (--json lists them all)"))
    if report.repair is not None:
        r = report.repair
        console.print(
            Text(
                f"  repair (audited): {r['upserted']:,} written, {r['deleted']:,} deleted, "
                f"{r['equal']:,} already equal, {r['skipped']:,} skipped for open writes; "
                f"{r['still_differing']:,} still differ, {r['unsettled']:,} unsettled"
            )
        )
    if report.gap:
        gap = report.gap
        if gap.get("closed"):
            console.print(
                Text(
                    f"  the {gap['side']}'s gap (open since {render.when(gap['since'])}) "
                    "is closed (audited)"
                )
            )
        else:
            console.print(Text(f"  gap: {gap.get('detail', 'not closed')}"))
    if report.error:
        console.print(Text(f"  {report.error}"))


def _show_backfill(report: BackfillReport) -> None:
    console = render.console()
    console.print(
        Text(
            f"{report.dataset}: backfill {report.status} (run {report.run}, {report.seconds:.1f} s)"
        )
    )
    for table in report.tables:
        t = table.as_json()
        console.print(
            Text(
                f"  {t['table']}: {t['rows']:,} rows written ({t['bytes'] / 1e6:,.1f} MB); "
                f"{t['rows_per_second']:,} rows/s, {t['mb_per_second']} MB/s; batches: "
                f"{t['batches']['direct']} straight in, {t['batches']['staged']} staged"
            )
        )
    s = report.settled
    if s:
        console.print(
            Text(
                f"  written during the copy: {s['written']:,} record(s), {s['differed']:,} "
                f"differed, {s['upserted'] + s['deleted']:,} repaired"
                + (f"; {s['unknowable']} write(s) name no record" if s["unknowable"] else "")
            )
        )
    if report.verification is not None:
        _show_verification(report.verification)
