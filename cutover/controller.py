"""Stage changes as SREs ask for them: checked, compare-and-set with audit, then announced.

The CLI (directly on the stores) and the admin API both call :func:`move`, so a change made
either way is checked and audited the same way. A move is first *assessed* (a pure function:
the stage rules, the gap rule, and the steps a real move takes); then the switcher takes those
steps (``cutover/switch.py``). A dry run takes the same steps with every side effect off, so
it refuses what the real move would refuse now, and the two cannot drift apart.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from bascule.checks import check_actor, check_name, require_reason
from bascule.config import Config
from bascule.errors import IllegalMove, Refused, StaleVersion
from bascule.stages import (
    GapOpen,
    Side,
    Stage,
    authority,
    blocking_gaps,
    check_move,
    illegal,
    is_rollback,
    previous,
    role,
    when,
)
from bascule.state import audit
from bascule.state.stage_store import StageRow, StageStore
from cutover.gate import Gate, GateClosed, GateReport, gated
from cutover.switch import Switcher, planned_steps


class Announcer(Protocol):
    async def announce(self, row: StageRow) -> bool:
        """Tell every replica about a change; False when that could not be done (they poll)."""
        ...


@dataclass(frozen=True, slots=True)
class Check:
    """One rule a move was checked against, and what it found."""

    name: str
    ok: bool
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class Assessment:
    """What the rules say of a move, and what a real move would do. Pure (see :func:`assess`)."""

    checks: tuple[Check, ...]
    refusal: Refused | None
    """The first rule that refuses the move, or None."""
    forced_gaps: dict[Side, datetime]
    """Open gaps that ``force`` overrides (audited)."""
    steps: tuple[str, ...]
    """The steps a real move takes (:func:`cutover.switch.planned_steps`)."""


@dataclass(frozen=True)
class MoveResult:
    before: StageRow
    wanted: Stage
    after: StageRow | None
    """None for a dry run."""
    announced: bool
    dry_run: bool = False
    checks: tuple[Check, ...] = ()
    steps: tuple[str, ...] = ()
    refusal: str | None = None
    """Why the move would be refused (dry runs only; a real refused move raises)."""
    forced_gaps: Mapping[Side, datetime] | None = None
    done: tuple[str, ...] = ()
    """The steps a real move took (the fence, the barrier, confirmations), in order; for a dry
    run, what each step's check found."""
    lagging: tuple[str, ...] = ()
    """Replicas seen within ``[switch] seen_within`` that had not confirmed the change when the
    wait ended, their lease alive or run out (cut off, frozen)."""
    unconfirmed: tuple[dict[str, Any], ...] = ()
    """Each of them: the version it runs, its last report, its lease, when its stages go
    stale."""
    gate: GateReport | None = None
    """What the gate found, for a forward move past ``shadow``."""
    forced_gate: tuple[str, ...] = ()
    """The gate's failing conditions that ``force`` overrode (audited)."""
    group: Group | None = None
    """The group the dataset moved with, if any."""
    moved: tuple[StageRow, ...] = ()
    """Every dataset's row after the move (the group's members, or the dataset alone)."""

    @property
    def allowed(self) -> bool:
        return self.refusal is None

    def as_json(self) -> dict[str, Any]:
        row = self.after or self.before
        return {
            "dataset": self.before.dataset,
            "from": self.before.stage.value,
            "to": self.wanted.value,
            "version": row.version,
            "write_epoch": row.write_epoch,
            "announced": self.announced,
            "dry_run": self.dry_run,
            "allowed": self.allowed,
            "refusal": self.refusal,
            "forced": bool(self.forced_gaps) or bool(self.forced_gate),
            "forced_gate": list(self.forced_gate),
            "forced_gaps": {s.value: t.isoformat() for s, t in (self.forced_gaps or {}).items()},
            "checks": [c.as_json() for c in self.checks],
            "steps": list(self.steps),
            "done": list(self.done),
            "lagging_replicas": list(self.lagging),
            "unconfirmed_replicas": list(self.unconfirmed),
            "gate": None if self.gate is None else self.gate.as_json(),
            "group": None
            if self.group is None
            else {
                "name": self.group.name,
                "members": list(self.group.members),
                "moved": [
                    {"dataset": r.dataset, "stage": r.stage.value, "version": r.version}
                    for r in self.moved
                ],
            },
        }


def assess(
    row: StageRow, wanted: Stage, *, force: bool, illegal_move: IllegalMove | None = None
) -> Assessment:
    """Check ``row.stage -> wanted`` against the stage rules and the gap rule, and say what a
    real move would do. Pure: the same answer for a dry run and a real move.
    ``illegal_move``: a refusal found before (a rollback that does not go back)."""
    dataset, current = row.dataset, row.stage
    checks: list[Check] = []
    refusal: Refused | None = None
    try:
        if illegal_move is not None:
            raise illegal_move
        check_move(dataset, current, wanted)
        how = "a rollback" if is_rollback(current, wanted) else "forward one stage"
        checks.append(Check("legal move", True, f"{current.value} -> {wanted.value}: {how}"))
    except IllegalMove as exc:
        checks.append(Check("legal move", False, str(exc)))
        refusal = exc
    blocking = blocking_gaps(wanted, row.gaps)
    forced: dict[Side, datetime] = {}
    if not blocking:
        harmless = [
            f"the {side.value}'s gap (open since {when(since)}) does not block {wanted.value}: "
            f"there it would {role(side, wanted)}"
            for side, since in sorted(row.gaps.items())
        ]
        checks.append(Check("gaps", True, "; ".join(harmless) or "no open gap"))
    else:
        gap_refusal = GapOpen(dataset, current, wanted, blocking)
        if force:
            forced = blocking
            detail = f"overridden by force (audited): {gap_refusal.why}"
            checks.append(Check("gaps", True, detail))
        else:
            checks.append(Check("gaps", False, gap_refusal.why))
            refusal = refusal or gap_refusal
    legal = checks[0].ok
    # An illegal move has no steps; a legal one, those a real move takes (cutover/switch.py).
    steps = tuple(step.text for step in planned_steps(row, wanted)) if legal else ()
    return Assessment(tuple(checks), refusal, forced, steps)


Require = Callable[[Any, list[StageRow]], Awaitable[None]]
"""A caller's own condition on the rows locked for a commit (a session, the rows); it raises
to refuse the change."""


async def turn_off_auto_promote(conn: Any, row: StageRow, actor: str, reason: str) -> None:
    """``auto_promote`` off for ``row``'s dataset as part of a rollback, on its transaction."""
    if row.auto_promote is False:
        return
    await conn.execute(
        "UPDATE bascule_stage SET auto_promote = false WHERE dataset = $1", row.dataset
    )
    await audit.record(
        conn,
        row.dataset,
        "auto-promote",
        actor=actor,
        reason=f"turned off by the rollback: {reason}",
        details={"was": row.auto_promote, "now": False, "stage": row.stage.value},
    )


@dataclass(frozen=True)
class Group:
    """Datasets whose data depend on each other: they move through the stages together, as
    one audited change, or not at all (``[datasets.X] group``)."""

    name: str
    members: tuple[str, ...]
    """In name order."""


Groups = Mapping[str, Group]
"""Each grouped dataset's group."""


def groups_of(config: Config) -> dict[str, Group]:
    """The groups of the configuration, by member (a group of one is no group)."""
    found: dict[str, list[str]] = {}
    for name, dataset in config.datasets.items():
        if dataset.group is not None:
            found.setdefault(dataset.group, []).append(name)
    return {
        member: Group(group, tuple(sorted(members)))
        for group, members in found.items()
        if len(members) > 1
        for member in members
    }


async def move(
    store: StageStore,
    announcer: Announcer,
    dataset: str,
    wanted: Stage,
    *,
    actor: str,
    reason: str | None,
    expected_version: int | None = None,
    action: str = "stage",
    details: Mapping[str, Any] | None = None,
    force: bool = False,
    dry_run: bool = False,
    switcher: Switcher | None = None,
    gate: Gate | None = None,
    groups: Groups | None = None,
    illegal_move: IllegalMove | None = None,
    require: Require | None = None,
) -> MoveResult:
    """Move ``dataset`` to ``wanted`` if the rules allow it. Raises IllegalMove, GapOpen,
    GateClosed, StaleVersion, UnknownDataset or UsageError (all refusals: nothing changes). A
    dry run changes nothing, announces nothing, and returns what was found instead of raising
    it. ``force`` overrides the gap rule and the gate, never an illegal move, and is audited
    with the figures it overrode. ``gate``: None only in tests of the stage rules alone. A
    dataset of a group (``groups``) moves with every other member, or none moves.
    ``illegal_move``: a refusal already found (a rollback that does not go back), reported as
    the rules' own. ``require``: the caller's own condition, checked on the locked rows at the
    commit (the controller's: its lease, auto_promote)."""
    why = _reason(reason, dry_run)
    check_actor(actor)
    befores = await _members(store, check_name(dataset), groups)
    before = next(r for r in befores if r.dataset == dataset)
    if expected_version is not None and expected_version != before.version:
        raise StaleVersion(dataset, expected_version, before.version)
    return await _move(
        store,
        announcer,
        dataset,
        befores,
        wanted,
        actor=actor,
        reason=why,
        action=action,
        details=details,
        force=force,
        dry_run=dry_run,
        illegal_move=illegal_move,
        switcher=switcher,
        gate=gate,
        group=groups.get(dataset) if groups else None,
        require=require,
    )


async def rollback(
    store: StageStore,
    announcer: Announcer,
    dataset: str,
    *,
    to: Stage | None,
    actor: str,
    reason: str | None,
    details: Mapping[str, Any] | None = None,
    force: bool = False,
    dry_run: bool = False,
    switcher: Switcher | None = None,
    gate: Gate | None = None,
    groups: Groups | None = None,
    expected_version: int | None = None,
    require: Require | None = None,
) -> MoveResult:
    """Move back: to the previous stage, or to ``to`` (any earlier stage). Never gated. A
    rollback from ``live`` or later to ``shadow`` or earlier turns ``auto_promote`` off (in its
    own transaction, audited): whoever rolled back had a reason the controller cannot see."""
    before = await store.get(check_name(dataset))
    wanted = to if to is not None else previous(before.stage)
    bad = None
    if wanted is None:
        wanted = before.stage
        bad = illegal(dataset, before.stage, wanted, "it is already at the first stage")
    elif not is_rollback(before.stage, wanted):
        bad = illegal(dataset, before.stage, wanted, "a rollback moves to an earlier stage")
    return await move(
        store,
        announcer,
        dataset,
        wanted,
        actor=actor,
        reason=reason,
        action="rollback",
        details=details,
        force=force,
        dry_run=dry_run,
        switcher=switcher,
        gate=gate,
        groups=groups,
        illegal_move=bad,
        expected_version=expected_version,
        require=require,
    )


async def _members(store: StageStore, dataset: str, groups: Groups | None) -> list[StageRow]:
    """The rows of every dataset that moves with ``dataset`` (itself alone, or its group's,
    which must all be at one stage)."""
    group = groups.get(dataset) if groups else None
    if group is None:
        return [await store.get(dataset)]
    rows = await store.all()
    missing = [m for m in group.members if m not in rows]
    if missing:
        await store.get(missing[0])  # UnknownDataset names the known ones
    found = [rows[m] for m in group.members]
    stages = {r.stage for r in found}
    if len(stages) > 1:
        where = ", ".join(f"{r.dataset} at {r.stage.value}" for r in found)
        raise Refused(
            f"{dataset}: its group {group.name!r} is split across stages ({where}): its members "
            "move together; bring them to one stage first (each one alone, with the group "
            "removed from the configuration for that move); nothing was changed"
        )
    return found


def _reason(reason: str | None, dry_run: bool) -> str:
    """Required for a change; optional for a dry run (which writes no audit)."""
    if dry_run and (reason is None or not reason.strip()):
        return ""
    return require_reason(reason)


@dataclass
class _Judged:
    """One member's checks, refusal and what ``force`` overrode."""

    checks: tuple[Check, ...]
    refusal: Refused | None
    forced_gaps: dict[Side, datetime]
    forced_gate: tuple[str, ...]
    report: GateReport | None
    recorded: dict[str, Any]


async def _judge(
    before: StageRow,
    wanted: Stage,
    *,
    force: bool,
    illegal_move: IllegalMove | None,
    gate: Gate | None,
    details: Mapping[str, Any] | None,
) -> tuple[_Judged, Assessment]:
    """The stage rules, the gap rule and the gate for one dataset's move."""
    found = assess(before, wanted, force=force, illegal_move=illegal_move)
    checks, refusal = found.checks, found.refusal
    recorded = dict(details or {})
    report: GateReport | None = None
    forced_gate: tuple[str, ...] = ()
    if checks[0].ok and gate is not None and gated(before.stage, wanted):
        report = await gate.judge(before, wanted)
        # The figures go into the audit whatever the answer: what the gate saw at the move.
        recorded["gate"] = report.figures()
        if report.ok:
            checks = (*checks, Check("gate", True, "every condition holds"))
        elif force:
            forced_gate = tuple(c.name for c in report.failing)
            recorded["forced_gate"] = list(forced_gate)
            overridden = f"overridden by force (audited): {report.why()}"
            checks = (*checks, Check("gate", True, overridden))
        else:
            checks = (*checks, Check("gate", False, report.why()))
            refusal = refusal or GateClosed(report)
    if found.forced_gaps:
        recorded["forced_gaps"] = {s.value: t.isoformat() for s, t in found.forced_gaps.items()}
    judged = _Judged(checks, refusal, found.forced_gaps, forced_gate, report, recorded)
    return judged, found


async def _move(
    store: StageStore,
    announcer: Announcer,
    dataset: str,
    befores: list[StageRow],
    wanted: Stage,
    *,
    actor: str,
    reason: str,
    action: str,
    details: Mapping[str, Any] | None,
    force: bool,
    dry_run: bool,
    illegal_move: IllegalMove | None = None,
    switcher: Switcher | None = None,
    gate: Gate | None = None,
    group: Group | None = None,
    require: Require | None = None,
) -> MoveResult:
    if group is not None:
        details = {
            **(details or {}),
            "group": group.name,
            "members": list(group.members),
            "change": uuid.uuid4().hex[:12],  # the one change every member's audit row is part of
        }
    judged: dict[str, _Judged] = {}
    found: Assessment | None = None
    for row in befores:
        bad = illegal_move if row.dataset == dataset else None
        one, assessed = await _judge(
            row, wanted, force=force, illegal_move=bad, gate=gate, details=details
        )
        judged[row.dataset] = one
        if row.dataset == dataset:
            found = assessed
    assert found is not None
    mine = judged[dataset]
    checks = mine.checks
    if group is not None:
        checks = tuple(
            Check(f"{name}: {c.name}" if name != dataset else c.name, c.ok, c.detail)
            for name, one in judged.items()
            for c in one.checks
        )
    refusal = next((one.refusal for one in judged.values() if one.refusal is not None), None)
    steps = tuple(step.text for step in planned_steps(befores, wanted)) if checks[0].ok else ()
    if dry_run:
        findings: tuple[str, ...] = ()
        if refusal is None and switcher is not None:
            # The same steps a real move takes, side effects off (Vitess's SwitchTraffic
            # --dry-run): what it would meet now, it reports instead of meeting it.
            rehearsed, refusal = await switcher.rehearse(dataset, befores, wanted)
            detail = str(refusal) if refusal else "; ".join(rehearsed.steps)
            checks = (*checks, Check("switch", refusal is None, detail))
            findings = tuple(rehearsed.steps)
        return MoveResult(
            next(r for r in befores if r.dataset == dataset),
            wanted,
            None,
            False,
            dry_run=True,
            checks=checks,
            steps=steps,
            refusal=None if refusal is None else str(refusal),
            forced_gaps=mine.forced_gaps,
            done=findings,
            gate=mine.report,
            forced_gate=mine.forced_gate,
            group=group,
        )
    if refusal is not None:
        raise refusal
    # The gaps were checked on ``befores``; the compare-and-set on their versions keeps that
    # sound: a gap opens only with a stage change (which bumps the version), and a gap closed
    # meanwhile only makes the check stricter than needed. The gate's evidence is tied to
    # that version too: a change in between makes the compare-and-set fail.
    forced = any(one.forced_gaps or one.forced_gate for one in judged.values())

    async def again(conn: Any, locked: list[StageRow]) -> None:
        """The gap rule and the gate judged again on the rows locked for the commit: a gap
        opened (a skipped write) or evidence found (a mismatch) while the switch waited cannot
        slip through (neither bumps the version the compare-and-set is on)."""
        for row in locked:
            blocking = blocking_gaps(wanted, row.gaps)
            if blocking and not force:
                raise GapOpen(row.dataset, row.stage, wanted, blocking)
            if gate is not None and gated(row.stage, wanted) and not force:
                report = await gate.judge(row, wanted, on=conn)
                if not report.ok:
                    raise GateClosed(report)
        if require is not None:
            await require(conn, locked)
        if authority(befores[0].stage) is Side.TARGET and authority(wanted) is Side.SOURCE:
            for row in locked:
                await turn_off_auto_promote(conn, row, actor, reason)

    def commit() -> Awaitable[list[StageRow]]:
        return store.change_many(
            [(r.dataset, r.version, judged[r.dataset].recorded) for r in befores],
            wanted,
            actor=actor,
            reason=reason,
            action=action,
            forced=forced,
            check=again,
        )

    if switcher is None:  # no fence to take (tests of the stage rules alone)
        afters = await commit()
        announced = all([await announcer.announce(after) for after in afters])
        done: tuple[str, ...] = ()
        lagging: tuple[str, ...] = ()
        unconfirmed: tuple[dict[str, Any], ...] = ()
    else:
        afters, outcome = await switcher.change_group(befores, wanted, commit, announcer.announce)
        announced, done, lagging = outcome.announced, tuple(outcome.steps), tuple(outcome.lagging)
        unconfirmed = tuple(outcome.unconfirmed)
    before = next(r for r in befores if r.dataset == dataset)
    after = next(r for r in afters if r.dataset == dataset)
    return MoveResult(
        before,
        wanted,
        after,
        announced,
        checks=checks,
        steps=steps,
        forced_gaps=mine.forced_gaps,
        done=done,
        lagging=lagging,
        unconfirmed=unconfirmed,
        gate=mine.report,
        forced_gate=mine.forced_gate,
        group=group,
        moved=tuple(afters),
    )


@dataclass(frozen=True)
class GapClosed:
    row: StageRow
    side: Side
    since: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "dataset": self.row.dataset,
            "side": self.side.value,
            "since": self.since.isoformat(),
            "stage": self.row.stage.value,
            "version": self.row.version,
            "gaps": self.row.as_json()["gaps"],
        }


async def close_gap(
    store: StageStore,
    dataset: str,
    side: Side,
    *,
    actor: str,
    reason: str | None,
    details: Mapping[str, Any] | None = None,
    opened_before: datetime | None = None,
) -> GapClosed:
    """Close ``side``'s gap, audited. Refused (nothing changes) when it has none, or while
    writes do not reach that side, or (``opened_before``: a verification's) when the side
    missed a write after that time."""
    why = require_reason(reason)
    check_actor(actor)
    row, since = await store.close_gap(
        check_name(dataset),
        side,
        actor=actor,
        reason=why,
        details=details,
        opened_before=opened_before,
    )
    return GapClosed(row, side, since)
