"""Stage changes as SREs ask for them: checked, compare-and-set with audit, then announced.

The CLI (directly on the stores) and the admin API both call :func:`move`, so a change made
either way is checked and audited the same way. A move is first *assessed* (a pure function:
the stage rules, the gap rule, and the steps a real move takes); then the switcher takes those
steps (``cutover/switch.py``). A dry run takes the same steps with every side effect off, so
it refuses what the real move would refuse now, and the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from bascule.checks import check_actor, check_name, require_reason
from bascule.errors import IllegalMove, Refused, StaleVersion
from bascule.stages import (
    GapOpen,
    Side,
    Stage,
    blocking_gaps,
    check_move,
    illegal,
    is_rollback,
    previous,
    role,
    when,
)
from bascule.state.stage_store import StageRow, StageStore
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
    """Live replicas that had not confirmed the change when the wait ended."""

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
            "forced": bool(self.forced_gaps),
            "forced_gaps": {s.value: t.isoformat() for s, t in (self.forced_gaps or {}).items()},
            "checks": [c.as_json() for c in self.checks],
            "steps": list(self.steps),
            "done": list(self.done),
            "lagging_replicas": list(self.lagging),
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
) -> MoveResult:
    """Move ``dataset`` to ``wanted`` if the rules allow it. Raises IllegalMove, GapOpen,
    StaleVersion, UnknownDataset or UsageError (all refusals: nothing changes). A dry run
    changes nothing, announces nothing, and returns what was found instead of raising it.
    ``force`` overrides the gap rule only, and is audited."""
    why = _reason(reason, dry_run)
    check_actor(actor)
    before = await store.get(check_name(dataset))
    if expected_version is not None and expected_version != before.version:
        raise StaleVersion(dataset, expected_version, before.version)
    return await _move(
        store,
        announcer,
        before,
        wanted,
        actor=actor,
        reason=why,
        action=action,
        details=details,
        force=force,
        dry_run=dry_run,
        switcher=switcher,
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
) -> MoveResult:
    """Move back: to the previous stage, or to ``to`` (any earlier stage)."""
    why = _reason(reason, dry_run)
    check_actor(actor)
    before = await store.get(check_name(dataset))
    wanted = to if to is not None else previous(before.stage)
    bad = None
    if wanted is None:
        wanted = before.stage
        bad = illegal(dataset, before.stage, wanted, "it is already at the first stage")
    elif not is_rollback(before.stage, wanted):
        bad = illegal(dataset, before.stage, wanted, "a rollback moves to an earlier stage")
    return await _move(
        store,
        announcer,
        before,
        wanted,
        actor=actor,
        reason=why,
        action="rollback",
        details=details,
        force=force,
        dry_run=dry_run,
        illegal_move=bad,
        switcher=switcher,
    )


def _reason(reason: str | None, dry_run: bool) -> str:
    """Required for a change; optional for a dry run (which writes no audit)."""
    if dry_run and (reason is None or not reason.strip()):
        return ""
    return require_reason(reason)


async def _move(
    store: StageStore,
    announcer: Announcer,
    before: StageRow,
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
) -> MoveResult:
    found = assess(before, wanted, force=force, illegal_move=illegal_move)
    if dry_run:
        checks, refusal = found.checks, found.refusal
        findings: tuple[str, ...] = ()
        if refusal is None and switcher is not None:
            # The same steps a real move takes, side effects off (Vitess's SwitchTraffic
            # --dry-run): what it would meet now, it reports instead of meeting it.
            rehearsed, refusal = await switcher.rehearse(before.dataset, before, wanted)
            detail = str(refusal) if refusal else "; ".join(rehearsed.steps)
            checks = (*checks, Check("switch", refusal is None, detail))
            findings = tuple(rehearsed.steps)
        return MoveResult(
            before,
            wanted,
            None,
            False,
            dry_run=True,
            checks=checks,
            steps=found.steps,
            refusal=None if refusal is None else str(refusal),
            forced_gaps=found.forced_gaps,
            done=findings,
        )
    if found.refusal is not None:
        raise found.refusal
    recorded = dict(details or {})
    if found.forced_gaps:
        recorded["forced_gaps"] = {s.value: t.isoformat() for s, t in found.forced_gaps.items()}
    # The gaps were checked on ``before``; the compare-and-set on its version keeps that sound:
    # a gap opens only with a stage change (which bumps the version), and a gap closed meanwhile
    # only makes the check stricter than needed.

    def commit() -> Awaitable[StageRow]:
        return store.change(
            before.dataset,
            before.version,
            wanted,
            actor=actor,
            reason=reason,
            action=action,
            forced=bool(found.forced_gaps),
            details=recorded,
        )

    if switcher is None:  # no fence to take (tests of the stage rules alone)
        after = await commit()
        announced = await announcer.announce(after)
        done: tuple[str, ...] = ()
        lagging: tuple[str, ...] = ()
    else:
        after, outcome = await switcher.change(
            before.dataset, before, wanted, commit, announcer.announce
        )
        announced, done, lagging = outcome.announced, tuple(outcome.steps), tuple(outcome.lagging)
    return MoveResult(
        before,
        wanted,
        after,
        announced,
        checks=found.checks,
        steps=found.steps,
        forced_gaps=found.forced_gaps,
        done=done,
        lagging=lagging,
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
) -> GapClosed:
    """Close ``side``'s gap, audited. Refused (nothing changes) when it has none, or while
    writes do not reach that side."""
    why = require_reason(reason)
    check_actor(actor)
    row, since = await store.close_gap(
        check_name(dataset), side, actor=actor, reason=why, details=details
    )
    return GapClosed(row, side, since)
