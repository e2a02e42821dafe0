"""The gate: whether a dataset may move forward past ``shadow``, condition by condition, with
the figure behind each.

Its evidence is read from Postgres only (Redis's counters are on-call's fast path, and a Redis
restart must never open the gate), and only what was observed under the dataset's current
stage version, from when that stage took effect: a flip never borrows the previous stage's
figures. The conditions (docs/architecture.md, *The gate*):

- **window**: the current stage has been in effect for the whole window;
- **volume**: at least ``min_compared`` comparisons in it, and **routes**: every read route seen
  in it has comparisons;
- **mismatches** and **errored**: zero of each, of this stage version;
- **backlog**: no journaled write waiting for its replay longer than ``replay_grace``, and
  **journal**: nothing dead, in doubt, or left by a writer that died;
- **gap**: no open gap on the side about to serve, and **verified**: a clean stored-data
  verification begun after either side last missed a write or started being written again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from bascule.config import Config, GateSettings
from bascule.errors import Refused
from bascule.stages import ORDER, Side, Stage, serving, shadowed, when
from bascule.state.journal import queries
from bascule.state.postgres import Reader, reaching_postgres
from bascule.state.stage_store import StageRow


@dataclass(frozen=True, slots=True)
class Condition:
    name: str
    ok: bool
    figure: Any
    """The number (or list) the condition was judged on: what on-call and the audit see."""
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {"condition": self.name, "ok": self.ok, "figure": self.figure, "detail": self.detail}


@dataclass(frozen=True)
class GateReport:
    dataset: str
    stage: Stage
    version: int
    wanted: Stage | None
    """The move judged; None: the gate as it stands (``bascule gate``)."""
    since: datetime
    """Where the window's evidence starts."""
    conditions: tuple[Condition, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.conditions)

    @property
    def failing(self) -> tuple[Condition, ...]:
        return tuple(c for c in self.conditions if not c.ok)

    def figures(self) -> dict[str, Any]:
        """Each condition's figure, by name: what an audit row records of the gate."""
        return {c.name: c.figure for c in self.conditions}

    def why(self) -> str:
        return "; ".join(f"{c.name}: {c.detail}" for c in self.failing)

    def as_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "stage": self.stage.value,
            "version": self.version,
            "move": None if self.wanted is None else f"{self.stage.value} -> {self.wanted.value}",
            "since": self.since.isoformat(),
            "ok": self.ok,
            "conditions": [c.as_json() for c in self.conditions],
        }


class GateClosed(Refused):
    """A forward move past ``shadow`` the gate refuses. Nothing changed."""

    def __init__(self, report: GateReport) -> None:
        self.report = report
        move = f"{report.stage.value} -> {report.wanted.value if report.wanted else '?'}"
        super().__init__(
            f"{report.dataset}: the gate refuses {move}: {report.why()}; wait until every "
            "condition holds (`bascule gate " + report.dataset + "`), or override with "
            "`--force --reason TEXT` (audited with these figures)"
        )


def gated(current: Stage, wanted: Stage) -> bool:
    """Is ``current -> wanted`` a forward move past ``shadow``? Rollbacks never are."""
    return wanted.position == current.position + 1 and current.position >= Stage.SHADOW.position


LatestVerification = Callable[[asyncpg.Pool, str], "Any"]


@dataclass
class Gate:
    """The gate of every dataset, from the configuration's ``[datasets.X.gate]``."""

    pool: asyncpg.Pool
    settings: Mapping[str, GateSettings] = field(default_factory=dict)

    def of(self, dataset: str) -> GateSettings:
        return self.settings.get(dataset) or GateSettings()

    async def judge(
        self, row: StageRow, wanted: Stage | None = None, *, on: Reader | None = None
    ) -> GateReport:
        """Every condition of the gate, for ``row``'s dataset at its current stage version.
        ``wanted``: the move judged (it names the side about to serve); None judges the move
        forward from here. ``on``: the session to read on (a commit's, judging again the rows
        it has locked); by default one of the gate's pool."""
        settings = self.of(row.dataset)
        reader = on if on is not None else self.pool
        # The state database's clock: the stage's time and the evidence's are on it, and a
        # replica's own clock could be fast (a gate opened early) or slow.
        async with reaching_postgres():
            now: datetime = await reader.fetchval("SELECT now()")
        since = max(now - timedelta(seconds=settings.window), row.updated_at)
        if wanted is None:
            wanted = ORDER[min(row.stage.position + 1, len(ORDER) - 1)]
        evidence = await _evidence(reader, row.dataset, row.version, since)
        journal = await _journal(reader, row.dataset, settings.replay_grace)
        verified = await latest_clean_verification(reader, row.dataset)
        conditions = (
            _window(row, settings, now),
            *_comparisons(row.stage, settings, evidence),
            *_journal_conditions(journal, settings),
            _gap(row, wanted),
            _verified(row, settings, verified),
        )
        return GateReport(row.dataset, row.stage, row.version, wanted, since, conditions)


@dataclass(frozen=True)
class _Evidence:
    compared: int
    seen: dict[str, int]
    """Per read route seen in the window: its comparisons."""
    mismatches: int
    errored: int


async def _evidence(pool: Reader, dataset: str, version: int, since: datetime) -> _Evidence:
    async with reaching_postgres():
        counts = await pool.fetch(
            "SELECT route, coalesce(sum(n) FILTER (WHERE outcome = 'compared'), 0)::bigint"
            " AS compared FROM bascule_shadow_count WHERE dataset = $1 AND stage_version = $2"
            " AND minute >= date_trunc('minute', $3::timestamptz) GROUP BY route",
            dataset,
            version,
            since,
        )
        mismatches = await pool.fetchval(
            "SELECT count(*) FROM bascule_mismatch WHERE dataset = $1 AND stage_version = $2"
            " AND at >= $3",
            dataset,
            version,
            since,
        )
        errored = await pool.fetchval(
            "SELECT coalesce(sum(n), 0)::bigint FROM bascule_shadow_error WHERE dataset = $1"
            " AND stage_version = $2 AND minute >= date_trunc('minute', $3::timestamptz)",
            dataset,
            version,
            since,
        )
    seen = {r["route"]: int(r["compared"]) for r in counts}
    return _Evidence(sum(seen.values()), seen, int(mismatches), int(errored))


@dataclass(frozen=True)
class _Journal:
    waiting: int
    """Entries waiting longer than the replay grace."""
    oldest: float | None
    in_doubt: int
    dead: int
    orphans: int


async def _journal(pool: Reader, dataset: str, grace: float) -> _Journal:
    counts = (await queries.backlog(pool, dataset)).get(dataset, queries.EMPTY_BACKLOG)
    async with reaching_postgres():
        waiting = await pool.fetchval(
            "SELECT count(*) FROM bascule_journal_open($1)"
            " WHERE state IN ('intent', 'pending')"
            " AND created_at < now() - make_interval(secs => $2)",
            dataset,
            grace,
        )
    orphans = await queries.orphan_count(pool, dataset)
    return _Journal(
        int(waiting), counts["oldest_pending_seconds"], counts["in_doubt"], counts["dead"], orphans
    )


@dataclass(frozen=True)
class Verified:
    clean_since: datetime | None
    """Since when the rows the latest clean verification relies on were read (its start, or
    that of the first run of a resumed chain); None: never clean."""
    divergent_run: int | None
    """A finished verification newer than the latest clean one found the sides differ."""


async def latest_clean_verification(pool: Reader, dataset: str) -> Verified:
    """What the latest finished stored-data verifications of ``dataset`` say."""
    async with reaching_postgres():
        row = await pool.fetchrow(
            "SELECT (SELECT swept_since FROM bascule_verify_latest_clean WHERE dataset = $1)"
            "   AS clean_since,"
            " (SELECT id FROM bascule_verify_run WHERE dataset = $1 AND status = 'divergent'"
            "   AND swept_since > coalesce((SELECT swept_since FROM bascule_verify_latest_clean"
            "     WHERE dataset = $1), '-infinity') ORDER BY id DESC LIMIT 1) AS divergent_run",
            dataset,
        )
    assert row is not None
    return Verified(row["clean_since"], row["divergent_run"])


def _window(row: StageRow, settings: GateSettings, now: datetime) -> Condition:
    effect = (now - row.updated_at).total_seconds()
    ok = effect >= settings.window
    return Condition(
        "window",
        ok,
        round(effect, 1),
        f"{row.stage.value} (version {row.version}) in effect for {effect:.0f} s of the "
        f"{settings.window:g} s window",
    )


def _comparisons(stage: Stage, settings: GateSettings, found: _Evidence) -> tuple[Condition, ...]:
    compared_side = shadowed(stage)
    if compared_side is None:
        # rampdown -> target: nothing is shadow-read in rampdown; the comparisons were live's.
        return (
            Condition("volume", True, 0, f"nothing is compared in {stage.value}: not applicable"),
        )
    silent = sorted(route for route, n in found.seen.items() if n == 0)
    return (
        Condition(
            "volume",
            found.compared >= settings.min_compared,
            found.compared,
            f"{found.compared} comparisons of the {compared_side.value} in the window, "
            f"{settings.min_compared} needed",
        ),
        Condition(
            "routes",
            not silent,
            silent,
            "every read route seen in the window has comparisons"
            if not silent
            else f"read routes seen with no comparison: {', '.join(silent)}",
        ),
        Condition(
            "mismatches",
            found.mismatches == 0,
            found.mismatches,
            f"{found.mismatches} mismatches in the window (`bascule divergence`), 0 allowed",
        ),
        Condition(
            "errored",
            found.errored == 0,
            found.errored,
            f"{found.errored} comparisons could not be made in the window, 0 allowed",
        ),
    )


def _journal_conditions(found: _Journal, settings: GateSettings) -> tuple[Condition, ...]:
    stuck = found.in_doubt + found.dead + found.orphans
    return (
        Condition(
            "backlog",
            found.waiting == 0,
            found.waiting,
            f"{found.waiting} journaled writes waiting longer than {settings.replay_grace:g} s "
            "for their replay, 0 allowed",
        ),
        Condition(
            "journal",
            stuck == 0,
            {"in_doubt": found.in_doubt, "dead": found.dead, "orphans": found.orphans},
            f"{found.in_doubt} in doubt, {found.dead} dead, {found.orphans} left by a writer that "
            "died: none allowed (`bascule journal list`)",
        ),
    )


def _gap(row: StageRow, wanted: Stage) -> Condition:
    side: Side = serving(wanted)
    since = row.gaps.get(side)
    return Condition(
        "gap",
        since is None,
        None if since is None else since.isoformat(),
        f"no open gap on the {side.value}, which would serve in {wanted.value}"
        if since is None
        else f"the {side.value}, which would serve in {wanted.value}, has had an open gap since "
        f"{when(since)}",
    )


def _verified(row: StageRow, settings: GateSettings, found: Verified) -> Condition:
    last_gap, verified = row.last_gap_opened, found.clean_since
    figure = None if verified is None else verified.isoformat()
    if not settings.verification:
        return Condition(
            "verified",
            True,
            figure,
            "not required by the configuration ([datasets.X.gate] verification = false)",
        )
    if found.divergent_run is not None:
        return Condition(
            "verified",
            False,
            figure,
            f"the latest verification (run {found.divergent_run}) found the sides differ: "
            "repair them, then verify again (`bascule verify DATASET`)",
        )
    if verified is None:
        return Condition(
            "verified", False, None, "no clean verification yet (`bascule verify DATASET`)"
        )
    if last_gap is not None and verified < last_gap:
        return Condition(
            "verified",
            False,
            figure,
            f"the latest clean verification ({when(verified)}) began before a side last "
            f"missed a write or started being written again ({when(last_gap)})",
        )
    return Condition("verified", True, figure, f"clean verification started {when(verified)}")


def gates_of(config: Config, pool: asyncpg.Pool) -> Gate:
    """The gate a CLI or a replica uses, from the configuration."""
    return Gate(pool, {name: d.gate for name, d in config.datasets.items()})
