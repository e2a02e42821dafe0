"""SRE commands: migrate, status, stage, rollback, gap close, history, journal, divergence, noise.

The argument parsing of each command and its exit code. What a command does is
:class:`~bascule.app.operations.Operations` (on the stores, or through a proxy's admin API:
``bascule/app/clients.py``); how its answer looks is ``bascule/app/render.py``. Human output is
a table; ``--json`` is stable for scripts. Exit codes: 0 done, 1 error, 2 bad usage, 3 refused
(nothing changed).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from bascule.app import render
from bascule.app.clients import Client, client_for, config_of
from bascule.checks import check_actor, require_reason
from bascule.errors import EXIT_REFUSED, Refused, StoreError, UsageError
from bascule.stages import Side
from bascule.state import schema
from bascule.state.journal import queries
from bascule.state.postgres import open_pool, reaching_postgres
from bascule.state.servers import provide_stores
from bascule.state.stage_store import StageStore


def with_config() -> argparse.ArgumentParser:
    """The options every SRE command takes: ``--config`` and ``--json``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("BASCULE_CONFIG"),
        help="TOML configuration (default: $BASCULE_CONFIG)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False, parents=[with_config()])
    common.add_argument(
        "--admin",
        default=os.environ.get("BASCULE_ADMIN_URL"),
        help="go through this proxy admin API instead of the stores (default: $BASCULE_ADMIN_URL)",
    )

    p = sub.add_parser(
        "migrate",
        parents=[common],
        help="create or upgrade bascule's state schema and register datasets",
    )
    p.set_defaults(func=lambda a: run(_migrate(a)))

    p = sub.add_parser("status", parents=[common], help="each dataset's stage")
    p.add_argument("dataset", nargs="?")
    p.add_argument(
        "--watch",
        action="store_true",
        help="redraw the tables every --interval seconds until Ctrl-C (exit 0)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=WATCH_INTERVAL,
        help=f"seconds between two frames of --watch (default: {WATCH_INTERVAL:g})",
    )
    p.set_defaults(func=lambda a: run(_status(a)))

    audited = argparse.ArgumentParser(add_help=False)
    audited.add_argument("--reason", help="why (required; goes into the audit trail)")
    audited.add_argument("--by", default=os_user(), help="who (default: the OS user)")
    moving = argparse.ArgumentParser(add_help=False, parents=[audited])
    moving.add_argument(
        "--force",
        action="store_true",
        help="override the gap rule (a side that missed writes would serve, be authoritative "
        "or be compared); audited as forced",
    )
    moving.add_argument(
        "--dry-run",
        action="store_true",
        help="show the checks and the steps a real move would take; change nothing "
        "(exit 0 if it would be allowed, 3 if refused)",
    )

    p = sub.add_parser("stage", parents=[common, moving], help="move a dataset to a stage")
    p.add_argument("dataset")
    p.add_argument("stage")
    p.set_defaults(func=lambda a: run(_stage(a)))

    p = sub.add_parser("rollback", parents=[common, moving], help="move a dataset back")
    p.add_argument("dataset")
    p.add_argument("--to", help="stage to go back to (default: the previous one)")
    p.set_defaults(func=lambda a: run(_rollback(a)))

    gp = sub.add_parser("gap", help="gap markers: a side that missed writes")
    gsub = gp.add_subparsers(dest="gap_command", metavar="ACTION")
    gsub.required = True
    p = gsub.add_parser(
        "close",
        parents=[common, audited],
        help="close a side's gap once it is verified complete (audited)",
    )
    p.add_argument("dataset")
    p.add_argument("side", choices=[s.value for s in Side])
    p.set_defaults(func=lambda a: run(_gap_close(a)))

    jp = sub.add_parser(
        "journal", help="the dual-write journal: backlog, entries, retry, resolve, skip"
    )
    jsub = jp.add_subparsers(dest="journal_command", metavar="ACTION")
    jsub.required = True
    p = jsub.add_parser("status", parents=[common], help="backlog per dataset")
    p.add_argument("dataset", nargs="?")
    p.set_defaults(func=lambda a: run(_journal_status(a)))
    p = jsub.add_parser("list", parents=[common], help="entries in a state (never their bodies)")
    p.add_argument("--state", required=True, choices=["pending", "dead", "in-doubt", "intent"])
    p.add_argument("--dataset")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=lambda a: run(_journal_list(a)))
    p = jsub.add_parser(
        "retry",
        parents=[common, audited],
        help="send dead entries back to the replayer (audited; --reason optional)",
    )
    p.add_argument("seq", nargs="?", type=int)
    p.add_argument("--all-dead", action="store_true")
    p.set_defaults(func=lambda a: run(_journal_retry(a)))
    p = jsub.add_parser(
        "resolve",
        parents=[common, audited],
        help="say whether an entry in doubt was applied by its authoritative side (audited)",
    )
    p.add_argument("seq", type=int)
    p.add_argument("outcome", choices=["applied", "not-applied"])
    p.add_argument(
        "--record",
        help="for a create resolved as applied: the id of the record it made (read back from "
        "the authoritative side and replayed)",
    )
    p.set_defaults(func=lambda a: run(_journal_resolve(a)))
    p = jsub.add_parser(
        "skip", parents=[common, audited], help="give up replaying an entry (audited)"
    )
    p.add_argument("seq", type=int)
    p.set_defaults(func=lambda a: run(_journal_skip(a)))

    p = sub.add_parser(
        "auto-promote",
        parents=[common, audited],
        help="turn a dataset's auto_promote on or off (audited): the controller moves it "
        "shadow -> live once the gate holds only while it is on",
    )
    p.add_argument("dataset")
    p.add_argument("switch", choices=["on", "off"])
    p.set_defaults(func=lambda a: run(_auto_promote(a)))

    p = sub.add_parser(
        "gate",
        parents=[common],
        help="whether a dataset may move forward past shadow: each condition with its figure "
        "(exit 0 if it holds, 3 if not)",
    )
    p.add_argument("dataset")
    p.set_defaults(func=lambda a: run(_gate(a)))

    p = sub.add_parser(
        "divergence", parents=[common], help="recent mismatches grouped by where they differ"
    )
    p.add_argument("dataset")
    p.add_argument(
        "--since", type=float, default=24 * 3600.0, help="seconds back (default: one day)"
    )
    p.set_defaults(func=lambda a: run(_divergence(a)))

    p = sub.add_parser(
        "noise",
        parents=[common],
        help="noise proposals: pointers that differ between two answers of one side; "
        "list them, accept or reject one (audited)",
    )
    p.add_argument("dataset")
    p.add_argument("action", nargs="?", choices=["accept", "reject"])
    p.add_argument("pointer", nargs="?", help="the proposal's pattern, e.g. /records/*/served_at")
    p.add_argument(
        "--route", help="only this route template (default: every route it was proposed on)"
    )
    p.add_argument("--reason", help="why (required to decide; goes into the audit trail)")
    p.add_argument("--by", default=os_user(), help="who (default: the OS user)")
    p.set_defaults(func=lambda a: run(_noise(a)))

    p = sub.add_parser("history", parents=[common], help="the audit trail of stage changes")
    p.add_argument("dataset", nargs="?")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=lambda a: run(_history(a)))


WATCH_INTERVAL = 2.0
"""``bascule status --watch``'s default: a frame every 2 s."""


def os_user() -> str:
    """Who runs the command, as the audit records it unless ``--by`` says otherwise."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def run(coro: Coroutine[Any, Any, int]) -> int:
    """A command's coroutine, run to its exit code."""
    return asyncio.run(coro)


async def _migrate(args: argparse.Namespace) -> int:
    config = config_of(args)
    with provide_stores(config.state.postgres_url, config.state.redis_url, embed=False) as found:
        pool = await open_pool(found.postgres_url, max_size=1)
        try:
            async with reaching_postgres(), pool.acquire() as conn:
                applied = await schema.migrate(conn)
            added = await StageStore(pool).register(config.datasets, actor=os_user())
        finally:
            await pool.close()
    names = [f"{m.version:04d}_{m.name}" for m in applied]
    out = {"applied": names, "registered": added, "schema_version": schema.LATEST}
    if args.json:
        render.print_json(out)
    else:
        print(f"schema at version {schema.LATEST}; applied: {', '.join(names) or 'none'}")
        print(f"datasets registered at 'source': {', '.join(added) or 'none new'}")
    return 0


async def _status(args: argparse.Namespace) -> int:
    if args.watch:
        return await _watch(args)
    async with client_for(args, change=False) as client:
        rows, fleet = await _status_of(client, args.dataset)
    if args.json:
        render.print_json({"datasets": rows, "replicas": fleet})
    else:
        render.status(rows, fleet)
    return 0


async def _status_of(
    client: Client, dataset: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = await client.datasets()
    fleet = await client.replicas()
    if dataset:
        rows = [r for r in rows if r["dataset"] == dataset]
        if not rows:
            raise Refused(f"unknown dataset {dataset!r}")
    return rows, fleet


async def _watch(args: argparse.Namespace) -> int:
    """``status`` again every ``--interval`` seconds, drawn in place, until Ctrl-C (or
    SIGTERM): then exit 0, whatever the fetch under way. A frame that cannot be read (the
    state database or the admin API away) says so, and the next one tries again."""
    if args.json:
        raise UsageError("--watch draws tables for a person; for scripts, run --json repeatedly")
    if not 0.1 <= args.interval <= 3600:  # false for NaN too
        raise UsageError("--interval must be a number of seconds from 0.1 to 3600")
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        async with client_for(args, change=False) as client:
            with render.Watch() as screen:
                while True:
                    try:
                        rows, fleet = await _status_of(client, args.dataset)
                    except StoreError as exc:
                        screen.show(render.status_unread(str(exc), args.interval))
                    else:
                        screen.show(render.status_frame(rows, fleet, args.interval))
                    await asyncio.sleep(args.interval)
    except asyncio.CancelledError:
        if not stopped:
            raise
        task.uncancel()
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _stage(args: argparse.Namespace) -> int:
    async with client_for(args, change=True) as client:
        result = await client.stage(
            args.dataset, args.stage, args.by, args.reason, force=args.force, dry_run=args.dry_run
        )
    return _report_move(args, result)


async def _rollback(args: argparse.Namespace) -> int:
    async with client_for(args, change=True) as client:
        result = await client.rollback(
            args.dataset, args.to, args.by, args.reason, force=args.force, dry_run=args.dry_run
        )
    return _report_move(args, result)


def _report_move(args: argparse.Namespace, result: dict[str, Any]) -> int:
    """A move made, or a dry run: exit 3 when it would be refused (nothing changed either way)."""
    if args.json:
        render.print_json(result)
    elif result.get("dry_run"):
        render.dry_run(result)
    else:
        render.moved(result)
    if result.get("dry_run") and not result["allowed"]:
        raise Refused(result["refusal"])  # exit 3, the refusal on stderr like any other
    return 0


async def _gap_close(args: argparse.Namespace) -> int:
    reason = require_reason(args.reason)
    check_actor(args.by)
    async with client_for(args, change=True) as client:
        closed = await client.gap_close(args.dataset, args.side, args.by, reason)
    render.say(
        args.json,
        closed,
        f"{closed['dataset']}: the {closed['side']}'s gap (open since "
        f"{render.when(closed['since'])}) is closed, in {closed['stage']} (audited)",
    )
    return 0


async def _auto_promote(args: argparse.Namespace) -> int:
    reason = require_reason(args.reason)
    check_actor(args.by)
    async with client_for(args, change=True) as client:
        result = await client.auto_promote(args.dataset, args.switch == "on", args.by, reason)
    render.say(
        args.json,
        result,
        f"auto_promote {args.switch} for {', '.join(result['datasets'])} (audited)",
    )
    return 0


async def _gate(args: argparse.Namespace) -> int:
    async with client_for(args, change=False) as client:
        report = await client.gate_report(args.dataset)
    if args.json:
        render.print_json(report)
    else:
        render.gate(report)
    return 0 if report["ok"] else EXIT_REFUSED


async def _divergence(args: argparse.Namespace) -> int:
    if args.since <= 0:
        raise UsageError("--since must be a positive number of seconds")
    async with client_for(args, change=False) as client:
        found = await client.divergence(args.dataset, args.since)
    if args.json:
        render.print_json({**found, "dataset": args.dataset})
    else:
        render.divergence(args.dataset, args.since, found)
    return 0


async def _noise(args: argparse.Namespace) -> int:
    if args.action is None:
        return await _noise_list(args)
    if not args.pointer:
        raise UsageError(
            f"name the pointer to {args.action}: "
            f"bascule noise DATASET {args.action} POINTER --reason TEXT"
        )
    reason = require_reason(args.reason)
    check_actor(args.by)
    async with client_for(args, change=True) as client:
        result = await client.noise_decide(
            args.dataset, args.pointer, args.action == "accept", args.by, reason, args.route
        )
    render.say(args.json, result, render.noise_decided(result))
    return 0


async def _noise_list(args: argparse.Namespace) -> int:
    if args.reason is not None:
        raise UsageError("--reason goes with accept or reject")
    async with client_for(args, change=False) as client:
        found = await client.noise(args.dataset)
    rows = [r for r in found["proposals"] if args.route is None or r["route"] == args.route]
    if args.json:
        render.print_json({**found, "proposals": rows})
    else:
        render.noise(args.dataset, found["min_pairs"], rows)
    return 0


async def _history(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    async with client_for(args, change=False) as client:
        rows = await client.history(args.dataset, args.limit)
    if args.json:
        render.print_json({"history": rows})
    else:
        render.history(rows)
    return 0


async def _journal_status(args: argparse.Namespace) -> int:
    async with client_for(args, change=False) as client:
        counts = await client.journal_status()
    names = sorted(counts)
    if args.dataset:
        if args.dataset not in names:
            raise Refused(f"unknown dataset {args.dataset!r}")
        names = [args.dataset]
    rows = [{"dataset": n, **counts.get(n, queries.EMPTY_BACKLOG)} for n in names]
    if args.json:
        render.print_json({"journal": rows})
    else:
        render.journal(rows)
    return 0


async def _journal_list(args: argparse.Namespace) -> int:
    async with client_for(args, change=False) as client:
        rows = await client.journal_list(args.state, args.dataset, args.limit)
    if args.json:
        render.print_json({"entries": rows})
    else:
        render.journal_entries(args.state, rows)
    return 0


async def _journal_retry(args: argparse.Namespace) -> int:
    if (args.seq is None) == (not args.all_dead):
        raise UsageError("name one entry (SEQ) or pass --all-dead")
    check_actor(args.by)
    async with client_for(args, change=True) as client:
        count = await client.journal_retry(args.seq, args.all_dead, args.by, args.reason)
    render.say(
        args.json,
        {"retried": count},
        f"{count} dead entr{'y' if count == 1 else 'ies'} sent back to the replayer",
    )
    return 0


async def _journal_resolve(args: argparse.Namespace) -> int:
    reason = require_reason(args.reason)
    check_actor(args.by)
    async with client_for(args, change=True) as client:
        result = await client.journal_resolve(args.seq, args.outcome, args.record, args.by, reason)
    then = (
        "nothing is left to replay"
        if args.outcome == "not-applied"
        else "its record is read back from the authoritative side and replayed"
    )
    render.say(
        args.json,
        result,
        f"journal entry {args.seq} of {result['dataset']} resolved as {args.outcome}: {then}"
        " (audited)",
    )
    return 0


async def _journal_skip(args: argparse.Namespace) -> int:
    reason = require_reason(args.reason)
    check_actor(args.by)
    async with client_for(args, change=True) as client:
        dataset = await client.journal_skip(args.seq, args.by, reason)
    render.say(
        args.json,
        {"skipped": args.seq, "dataset": dataset},
        f"journal entry {args.seq} of {dataset} skipped (audited)",
    )
    return 0
