"""Stage changes as SREs ask for them: checked, compare-and-set with audit, then announced.

The CLI (directly on the stores) and the admin API both call :func:`move`, so a change made
either way is checked and audited the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bascule.errors import StaleVersion, UsageError
from cutover.stages import Stage, check_move, illegal, is_rollback, previous
from cutover.store import StageRow, StageStore


class Announcer(Protocol):
    async def announce(self, row: StageRow) -> bool:
        """Tell every replica about a change; False when that could not be done (they poll)."""
        ...


@dataclass(frozen=True)
class MoveResult:
    before: StageRow
    after: StageRow | None
    """None for a dry run."""
    announced: bool
    dry_run: bool = False
    steps: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "dataset": self.before.dataset,
            "from": self.before.stage.value,
            "to": (self.after.stage.value if self.after else None),
            "version": (self.after.version if self.after else self.before.version),
            "announced": self.announced,
            "dry_run": self.dry_run,
            "steps": self.steps,
        }


_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def check_name(dataset: str) -> str:
    """A dataset name as the configuration allows them, or UsageError (before any SQL)."""
    if not _NAME.match(dataset):
        raise UsageError(
            "a dataset name is lower-case letters, digits, '-' and '_', starting with a letter"
        )
    return dataset


def check_text(what: str, text: str) -> str:
    """Free text for the audit: any printable text, no control characters, bounded."""
    if _CONTROL.search(text):
        raise UsageError(f"{what}: control characters are not allowed")
    if len(text) > 2000:
        raise UsageError(f"{what}: at most 2000 characters")
    return text


def require_reason(reason: str | None) -> str:
    if reason is None or not reason.strip():
        raise UsageError("a reason is required (--reason TEXT): it goes into the audit trail")
    return check_text("reason", reason.strip())


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
) -> MoveResult:
    """Move ``dataset`` to ``wanted`` if the rules allow it. Raises IllegalMove, StaleVersion,
    UnknownDataset or UsageError (all refusals: nothing changes)."""
    why = require_reason(reason)
    if not actor.strip():
        raise UsageError("who makes the change must be named (--by)")
    check_text("by", actor)
    before = await store.get(check_name(dataset))
    if expected_version is not None and expected_version != before.version:
        raise StaleVersion(dataset, expected_version, before.version)
    check_move(dataset, before.stage, wanted)
    after = await store.change(
        dataset, before.version, wanted, actor=actor, reason=why, action=action, details=details
    )
    announced = await announcer.announce(after)
    return MoveResult(before, after, announced)


async def rollback(
    store: StageStore,
    announcer: Announcer,
    dataset: str,
    *,
    to: Stage | None,
    actor: str,
    reason: str | None,
    details: Mapping[str, Any] | None = None,
) -> MoveResult:
    """Move back: to the previous stage, or to ``to`` (any earlier stage)."""
    require_reason(reason)
    before = await store.get(check_name(dataset))
    wanted = to if to is not None else previous(before.stage)
    if wanted is None:
        raise illegal(dataset, before.stage, before.stage, "it is already at the first stage")
    if not is_rollback(before.stage, wanted):
        raise illegal(dataset, before.stage, wanted, "a rollback moves to an earlier stage")
    return await move(
        store,
        announcer,
        dataset,
        wanted,
        actor=actor,
        reason=reason,
        expected_version=before.version,
        action="rollback",
        details=details,
    )
