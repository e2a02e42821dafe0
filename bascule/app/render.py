"""How the CLI's answers look on a terminal: rich tables for people, stable JSON for scripts.

Every cell that carries text an operator typed (a reason, a name) is a :class:`rich.text.Text`,
never markup. No record value ever reaches these tables: they show stages, counts, pointers,
kinds and record tokens, as the operations answer them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import orjson
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bascule.checks import showable
from bascule.state.replicas import described


def console() -> Console:
    """The terminal's width on a terminal; wide enough for every column in a pipe or a log."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def when(iso: str) -> str:
    """Compact UTC time for tables (the JSON output keeps full ISO timestamps)."""
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def print_json(payload: Any) -> None:
    sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode() + "\n")


def say(as_json: bool, payload: dict[str, Any], text: str) -> None:
    if as_json:
        print_json(payload)
    else:
        print(text)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
    found = Table(title=title)
    for column in columns:
        found.add_column(column)
    for row in rows:
        # Text: free text is never markup; showable: never a line break or a bidi override
        found.add_row(*(Text(showable(cell)) for cell in row))
    return found


def status(rows: list[dict[str, Any]], fleet: list[dict[str, Any]]) -> None:
    """Each dataset's stage, backlog and gaps; each replica and the version it runs."""
    out = console()
    for found in status_tables(rows, fleet):
        out.print(found)


def status_frame(
    rows: list[dict[str, Any]], fleet: list[dict[str, Any]], every: float
) -> RenderableType:
    """One frame of ``bascule status --watch``: when it was read, then :func:`status`'s tables."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    head = Text(f"bascule status at {now}, every {every:g} s (Ctrl-C to stop)", style="bold")
    return Group(head, *status_tables(rows, fleet))


def status_unread(error: str, every: float) -> RenderableType:
    """A frame of ``bascule status --watch`` whose figures could not be read: it keeps trying."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    head = Text(f"bascule status at {now}, every {every:g} s (Ctrl-C to stop)", style="bold")
    return Group(head, Text(f"the figures could not be read: {showable(error)}", style="red"))


class Watch:
    """Frames drawn in place on a terminal (rich's live display); elsewhere (a pipe, a log)
    printed one after the other, each whole."""

    def __init__(self) -> None:
        self.out = console()
        self.live = Live(console=self.out, auto_refresh=False) if self.out.is_terminal else None

    def __enter__(self) -> Watch:
        if self.live is not None:
            self.live.start()
        return self

    def show(self, frame: RenderableType) -> None:
        if self.live is not None:
            self.live.update(frame, refresh=True)
        else:
            self.out.print(frame)
            self.out.print()
            self.out.file.flush()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.live is not None:
            self.live.stop()


def status_tables(rows: list[dict[str, Any]], fleet: list[dict[str, Any]]) -> list[Table]:
    """The datasets' table and the replicas' table."""
    cells = []
    for r in rows:
        oldest = r.get("oldest_pending_seconds")
        gaps = r.get("gaps") or {}
        open_gaps = ", ".join(f"{side} since {when(gaps[side])}" for side in gaps if gaps[side])
        cells.append(
            (
                r["dataset"],
                r["stage"],
                str(r["version"]),
                when(r["updated_at"]),
                r["updated_by"],
                r["reason"],
                str(r.get("backlog", 0)),
                f"{oldest:.1f}s" if oldest is not None else "-",
                str(r.get("in_doubt", 0)),
                str(r.get("dead", 0)),
                open_gaps or "-",
                shadow_counts(r.get("shadow") or {}),
            )
        )
    columns = "dataset stage version since by reason backlog oldest".split()
    columns += ["in doubt", "dead", "gaps", "shadow reads (this stage version)"]
    datasets = table("datasets", columns, cells)
    shown = [r["dataset"] for r in rows]
    current = {r["dataset"]: r["version"] for r in rows}
    replicas = []
    for rep in fleet:
        versions = rep["versions"]
        replicas.append(
            (
                rep["name"],
                "yes" if rep["alive"] else "lease expired",
                when(rep["seen_at"]),
                str(rep.get("sessions", "-")),
                *(
                    f"{versions.get(d, '-')}"
                    + ("" if versions.get(d) == current[d] else " (behind)")
                    for d in shown
                ),
            )
        )
    title = "replicas (the stage version each runs)"
    head = ("replica", "alive", "last report", "state sessions", *shown)
    return [datasets, table(title, head, replicas)]


def shadow_counts(counts: dict[str, int]) -> str:
    """The ledger's counts in one cell: compared, mismatched, errored, skipped, dropped."""
    if not any(counts.values()):
        return "-"
    skipped = sum(n for outcome, n in counts.items() if outcome.startswith("skipped"))
    return (
        f"{counts.get('compared', 0)} compared, {counts.get('mismatched', 0)} mismatched, "
        f"{counts.get('errored', 0)} errored, {skipped} skipped, {counts.get('dropped', 0)} dropped"
    )


def moved(result: dict[str, Any]) -> None:
    """A move that was made: what changed, the steps it took, and every replica seen lately
    that does not run it yet (what it still serves, until when)."""
    print(move(result))
    if result.get("done"):
        print("steps taken:")
        for i, step in enumerate(result["done"], 1):
            print(f"  {i}. {step}")
    behind = result.get("unconfirmed_replicas") or []
    if behind:
        print(f"replicas that have not confirmed version {result['version']}:")
        for replica in behind:
            print(f"  - {described(replica)}")


def move(result: dict[str, Any]) -> str:
    """One line for a move that was made."""
    note = ""
    if not result["announced"]:
        note = " (Redis unreachable: replicas will pick it up by polling)"
    forced = result.get("forced_gaps") or {}
    if forced:
        sides = ", ".join(f"the {side}'s gap (open since {when(t)})" for side, t in forced.items())
        note += f"; forced over {sides}: audited"
    return (
        f"{result['dataset']}: {result['from']} -> {result['to']} "
        f"(version {result['version']}){note}"
    )


def dry_run(result: dict[str, Any]) -> None:
    """What a real move would do, what its checks found, and whether it would be allowed."""
    print(
        f"{result['dataset']}: dry run of {result['from']} -> {result['to']} "
        f"(version {result['version']}, write epoch {result['write_epoch']}): nothing changed"
    )
    print("checks:")
    for check in result["checks"]:
        print(f"  {'ok' if check['ok'] else 'REFUSED':8} {check['check']}: {check['detail']}")
    print("a real move would:")
    for i, step in enumerate(result["steps"], 1):
        print(f"  {i}. {step}")
    if result.get("done"):
        print("found now:")
        for finding in result["done"]:
            print(f"  - {finding}")
    print("it would be allowed" if result["allowed"] else "it would be refused:")


def gate(report: dict[str, Any]) -> None:
    """Each condition of the gate, its figure, and whether it holds."""
    move = report["move"] or report["stage"]
    cells = [
        (
            "ok" if c["ok"] else "NO",
            c["condition"],
            orjson.dumps(c["figure"]).decode(),
            c["detail"],
        )
        for c in report["conditions"]
    ]
    title = (
        f"{report['dataset']}: the gate of {move} (stage version {report['version']}, "
        f"evidence since {when(report['since'])})"
    )
    console().print(table(title, ("", "condition", "figure", "detail"), cells))
    print("the gate holds" if report["ok"] else "the gate is closed")


def divergence(dataset: str, since: float, found: dict[str, Any]) -> None:
    rows, errored = found["divergence"], found["errored"]
    out = console()
    if "counts" in found:
        print(
            f"{dataset} in {found['stage']} (version {found['version']}): shadow reads "
            f"{shadow_counts(found['counts'])}"
        )
    cells = [
        (
            r["part"],
            r["pointer"] or "(whole)",
            r["kind"],
            str(r["count"]),
            when(r["first_seen"]),
            when(r["last_seen"]),
            " ".join(r["trace_ids"]),
        )
        for r in rows
    ]
    title = f"{dataset}: mismatches in the last {since:g} s, by pointer"
    columns = ("part", "pointer", "kind", "count", "first seen", "last seen", "traces")
    out.print(table(title, columns, cells))
    if not rows:
        print("no mismatch recorded in that window")
    if errored:
        failed = [
            (r["route"], r["reason"], str(r["count"]), when(r["first_seen"]), when(r["last_seen"]))
            for r in errored
        ]
        title = f"{dataset}: comparisons that could not be made, by reason"
        out.print(table(title, ("route", "reason", "count", "first seen", "last seen"), failed))


def noise(dataset: str, min_pairs: int, rows: list[dict[str, Any]]) -> None:
    cells = []
    for r in rows:
        decided = f"{r['decided_by']} {when(r['decided_at'])}" if r["decided_at"] else ""
        cells.append(
            (
                r["status"],
                r["pointer"],
                r["rule"] + (f" by {r['key']}" if r["key"] else ""),
                str(r["pairs"]),
                r["route"],
                when(r["first_seen"]),
                when(r["last_seen"]),
                decided,
                r["reason"] or "",
            )
        )
    title = (
        f"{dataset}: noise proposals (seen differing in at least {min_pairs} independent pairs "
        "of one side's answers)"
    )
    columns = ["status", "pointer", "rule", "pairs", "route", "first seen", "last seen"]
    columns += ["decided by", "reason"]
    console().print(table(title, columns, cells))
    if not rows:
        print("no noise proposal yet")


def noise_decided(result: dict[str, Any]) -> str:
    rules = ", ".join(
        f"{r['rule']}" + (f" by {r['key']}" if r["key"] else "") + f" on {r['route']}"
        for r in result["rules"]
    )
    note = ""
    if not result["announced"]:
        note = " (Redis unreachable: replicas will pick it up by polling)"
    return f"{result['dataset']}: {result['pointer']} {result['decision']} ({rules}); audited{note}"


def history(rows: list[dict[str, Any]]) -> None:
    cells = []
    for r in rows:
        by = r["actor"]
        details = r.get("details", {})
        if details.get("on_behalf_of"):
            by += f" for {details['on_behalf_of']}"
        action = r["action"]
        if action == "gap-close" and details.get("side"):
            action += f" {details['side']}"
        if action.startswith("noise-") and details.get("pointer"):
            action += f" {details['pointer']}"
        if r.get("forced"):
            action += " (forced)"
        cells.append(
            (
                when(r["at"]),
                r["dataset"],
                action,
                r["from_stage"] or "",
                r["to_stage"] or "",
                by,
                r["reason"],
            )
        )
    columns = ("when", "dataset", "action", "from", "to", "by", "reason")
    console().print(table("history", columns, cells))


def journal(rows: list[dict[str, Any]]) -> None:
    cells = []
    for r in rows:
        oldest = r["oldest_pending_seconds"]
        cells.append(
            (
                r["dataset"],
                str(r["backlog"]),
                f"{oldest:.1f}s" if oldest is not None else "-",
                str(r["in_doubt"]),
                str(r["dead"]),
            )
        )
    columns = ("dataset", "backlog", "oldest pending", "in doubt", "dead")
    console().print(table("journal", columns, cells))


def journal_entries(state: str, rows: list[dict[str, Any]]) -> None:
    cells = [
        (
            str(r["seq"]),
            r["dataset"],
            r["record"],
            r["route"],
            r["method"],
            str(r["status"] or "-"),
            str(r["attempts"]),
            r["last_error"] or "",
            when(r["created_at"]),
        )
        for r in rows
    ]
    columns = ("seq", "dataset", "record", "route", "method", "status", "attempts", "error")
    console().print(table(f"journal entries: {state}", (*columns, "since"), cells))
