"""Every operator command, written once: the CLI (on the stores) and the admin API both call it.

Each method checks its input (names, reasons, who), does the change with its audit, and
answers JSON-ready data; a refusal raises a :class:`~bascule.errors.BasculeError` that each
surface turns into its own form (an exit code, an HTTP status). Nothing here knows HTTP or a
terminal: ``bascule/app/admin.py`` and ``bascule/app/cli.py`` do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from bascule import metrics
from bascule.checks import check_actor, check_name, check_seq, check_text, require_reason
from bascule.config import Config, Route, Secrets
from bascule.errors import Refused, StoreError, UsageError
from bascule.sealing import DATASET_WIDE, Namer, Sealer
from bascule.stages import Side, Stage
from bascule.state import replicas
from bascule.state.journal import queries
from bascule.state.journal.entries import IllegalTransition
from bascule.state.stage_store import StageStore
from cutover import controller
from cutover.controller import Announcer, Groups
from cutover.gate import Gate
from cutover.switch import Switcher
from proxy.dualwrite import record_named
from proxy.resolver import NAMED
from proxy.routing import Router
from shadow import ledger
from shadow.noise_store import NoiseStore, pairs_needed

MAX_SINCE = 366 * 24 * 3600.0
"""The furthest back ``divergence`` looks: a year (ledger rows are kept for the gate's windows)."""

ONCALL_MINUTES = 60
"""The on-call page's chart: the last hour, a bar a minute."""
ONCALL_MISMATCHES_SINCE = 24 * 3600.0
"""The on-call page lists the mismatches of the last day, by pointer..."""
ONCALL_POINTERS = 20
"""... the most frequent first, up to this many (and says how many there were)."""

LISTED_STATES = {
    "pending": "pending",
    "dead": "dead",
    "in-doubt": "in_doubt",
    "in_doubt": "in_doubt",
    "intent": "intent",
}
"""Journal states SREs list entries in, as they spell them."""


@dataclass(frozen=True)
class Naming:
    """What naming the record an in-doubt create made takes: the routes (to name it as later
    writes to it are named), the record namer and the journal's sealer (its id is never
    stored in the clear). ``namer``/``sealer`` None: their keys are not in this environment."""

    router: Router
    routes: Mapping[tuple[str, str], Route]
    namer: Namer | None
    sealer: Sealer | None


def naming_of(config: Config, secrets: Secrets) -> Naming:
    return Naming(
        Router(config.routes, config.datasets),
        {(r.path, m): r for r in config.routes for m in r.methods},
        Namer(secrets.hmac_key) if secrets.hmac_key else None,
        Sealer(secrets.journal_key) if secrets.journal_key else None,
    )


NOT_RETRIED_IN_DOUBT = (
    "journal entry {seq} is in doubt, not dead: whether its authoritative side applied it is "
    "unknown, and the resolver keeps trying to settle it (it stays in doubt when it names no "
    "record and cannot be re-sent under its researcher's Idempotency-Key). Settle it yourself: "
    "`bascule journal resolve {seq} not-applied --reason …`, `bascule journal resolve {seq} "
    "applied --record ID --reason …` for a create whose record you found on the authoritative "
    "side, or `bascule journal skip {seq} --reason …` (opens the other side's gap)"
)


@dataclass(frozen=True)
class Operations:
    store: StageStore
    announcer: Announcer
    switcher: Switcher | None = None
    """Takes the write fence for changes that alter writes; None only in tests of the rules."""
    noise_store: NoiseStore | None = None
    """Noise proposals and decisions; None: the noise commands answer that they are away."""
    noise_pairs: Mapping[str, int] = field(default_factory=dict)
    """Each configured dataset's ``noise_pairs`` (:func:`shadow.noise_store.noise_pairs`)."""
    gate: Gate | None = None
    """The gate of moves past ``shadow``; None only in tests of the stage rules alone."""
    groups: Groups = field(default_factory=dict)
    """Datasets that move together (:func:`cutover.controller.groups_of`)."""
    naming: Naming | None = None
    """Names the record of an in-doubt create an SRE resolves as applied; None: refused."""

    # --- reading ---------------------------------------------------------------------------

    async def datasets(self) -> list[dict[str, Any]]:
        """Each dataset's stage row with its journal backlog."""
        rows = await self.store.all()
        counts = await queries.backlog(self.store.pool)
        shadowed = await ledger.counts_under(
            self.store.pool, {name: row.version for name, row in rows.items()}
        )
        return [
            {
                **rows[n].as_json(),
                **counts.get(n, queries.EMPTY_BACKLOG),
                "shadow": shadowed[n],  # the ledger's counts under the current stage version
            }
            for n in sorted(rows)
        ]

    async def history(self, dataset: str | None, limit: int) -> list[dict[str, Any]]:
        if dataset is not None:
            check_name(dataset)
        if limit < 1:
            raise UsageError("the limit must be at least 1")
        return [r.as_json() for r in await self.store.history(dataset, min(limit, 1000))]

    async def replicas(self) -> list[dict[str, Any]]:
        return [r.as_json() for r in await replicas.listing(self.store.pool)]

    async def divergence(self, dataset: str, since: float) -> dict[str, Any]:
        """Mismatches by pointer and the comparisons that could not be made, ``since`` seconds
        back."""
        if not 0 < since <= MAX_SINCE:  # false for NaN too
            raise UsageError(
                f"since must be a number of seconds, more than 0 and at most {MAX_SINCE:.0f} "
                "(a year)"
            )
        row = await self.store.get(check_name(dataset))  # UnknownDataset names the known ones
        start = datetime.now(UTC) - timedelta(seconds=since)
        counts = await ledger.counts_under(self.store.pool, {dataset: row.version})
        return {
            "dataset": dataset,
            "divergence": await ledger.divergence(self.store.pool, dataset, start),
            "errored": await ledger.errored(self.store.pool, dataset, start),
            "stage": row.stage.value,
            "version": row.version,
            "counts": counts[dataset],
        }

    async def journal_status(self) -> dict[str, dict[str, Any]]:
        counts = await queries.backlog(self.store.pool)
        return {n: counts.get(n, queries.EMPTY_BACKLOG) for n in sorted(await self.store.names())}

    async def journal_list(
        self, state: str, dataset: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Entries in ``state`` (never their bodies)."""
        listed = LISTED_STATES.get(state)
        if listed is None:
            raise UsageError("state must be one of pending, dead, in-doubt, intent")
        if dataset is not None:
            check_name(dataset)
        return await queries.listing(self.store.pool, listed, dataset, max(1, min(limit, 1000)))

    async def gate_report(self, dataset: str) -> dict[str, Any]:
        """The gate of ``dataset``'s move forward from its current stage, condition by
        condition, with figures."""
        check_name(dataset)
        if self.gate is None:
            raise StoreError("the gate is not available here")
        row = await self.store.get(dataset)
        return (await self.gate.judge(row)).as_json()

    async def noise(self, dataset: str) -> dict[str, Any]:
        noise = self._noise()
        min_pairs = pairs_needed(self.noise_pairs, dataset)
        rows = await noise.proposals(dataset, min_pairs)
        return {"dataset": dataset, "min_pairs": min_pairs, "proposals": rows}

    async def oncall(self) -> dict[str, Any]:
        """What the on-call page shows, per dataset: its stage and since when, the gate with
        each condition's figure, comparisons and mismatches per minute over the last hour, the
        recent mismatches by pointer (with trace ids), the journal's counts, and the noise
        proposals waiting for a decision. Stages, pointers, kinds, counts and trace ids only:
        nothing here holds a record value (the ledger and the journal's counts have none)."""
        rows = await self.store.all()
        names = sorted(rows)
        counts = await queries.backlog(self.store.pool)
        minutes = await ledger.per_minute(self.store.pool, names, ONCALL_MINUTES)
        since = datetime.now(UTC) - timedelta(seconds=ONCALL_MISMATCHES_SINCE)
        datasets = []
        for name in names:
            row = rows[name]
            gate = None if self.gate is None else (await self.gate.judge(row)).as_json()
            groups = await ledger.divergence(self.store.pool, name, since)
            noise = None
            if self.noise_store is not None:
                found = await self.noise_store.proposals(name, pairs_needed(self.noise_pairs, name))
                noise = [
                    {k: p[k] for k in ("pointer", "route", "rule", "key", "pairs", "last_seen")}
                    for p in found
                    if p["status"] == "pending"
                ]
            datasets.append(
                {
                    "dataset": name,
                    "stage": row.stage.value,
                    "version": row.version,
                    "since": row.updated_at.isoformat(),
                    "updated_by": row.updated_by,
                    "auto_promote": row.auto_promote,
                    "gaps": row.as_json()["gaps"],
                    "gate": gate,
                    "minutes": minutes[name],
                    "mismatches": groups[:ONCALL_POINTERS],
                    "mismatch_groups": len(groups),
                    "journal": counts.get(name, queries.EMPTY_BACKLOG),
                    "noise": noise,
                }
            )
        return {
            "at": datetime.now(UTC).isoformat(),
            "mismatches_since": since.isoformat(),
            "datasets": datasets,
        }

    # --- changing (each audited) -------------------------------------------------------------

    async def stage(
        self,
        dataset: str,
        stage: str,
        by: str,
        reason: str | None,
        *,
        force: bool = False,
        dry_run: bool = False,
        details: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        moving = self._moving(by, reason, force, dry_run, details)
        result = await controller.move(
            self.store, self.announcer, check_name(dataset), Stage.parse(stage), **moving
        )
        return result.as_json()

    async def rollback(
        self,
        dataset: str,
        to: str | None,
        by: str,
        reason: str | None,
        *,
        force: bool = False,
        dry_run: bool = False,
        details: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        moving = self._moving(by, reason, force, dry_run, details)
        to_stage = Stage.parse(to) if to else None
        result = await controller.rollback(
            self.store, self.announcer, check_name(dataset), to=to_stage, **moving
        )
        return result.as_json()

    def _moving(
        self,
        by: str,
        reason: str | None,
        force: bool,
        dry_run: bool,
        details: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """What a stage change and a rollback both pass the controller."""
        return {
            "actor": by,
            "reason": reason,
            "details": details,
            "force": force,
            "dry_run": dry_run,
            "switcher": self.switcher,
            "gate": self.gate,
            "groups": self.groups,
        }

    async def gap_close(
        self,
        dataset: str,
        side: str,
        by: str,
        reason: str | None,
        details: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        closed = await controller.close_gap(
            self.store,
            check_name(dataset),
            Side.parse(side),
            actor=by,
            reason=reason,
            details=details,
        )
        return closed.as_json()

    async def auto_promote(
        self,
        dataset: str,
        on: bool,
        by: str,
        reason: str | None,
        details: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Turn ``auto_promote`` on or off for ``dataset`` (and its group), audited: the
        controller promotes ``shadow -> live`` once the gate holds only while it is on, and an
        automatic rollback turns it off."""
        why = require_reason(reason)
        check_actor(by)
        group = self.groups.get(check_name(dataset))
        members = group.members if group is not None else (dataset,)
        rows = [
            await self.store.set_auto_promote(m, on, actor=by, reason=why, details=details)
            for m in members
        ]
        return {"auto_promote": on, "datasets": [r.dataset for r in rows]}

    async def journal_retry(
        self,
        seq: int | None,
        all_dead: bool,
        by: str = "operator",
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> int:
        """Send dead entries (one, or all) back to the replayer, audited; how many."""
        if (seq is None) == (not all_dead):
            raise UsageError("name one entry (its seq) or ask for all dead entries")
        if seq is not None:
            check_seq(seq)
        check_actor(by)
        why = check_text("reason", reason.strip()) if reason and reason.strip() else ""
        count = await queries.retry(
            self.store.pool,
            seq,
            all_dead=all_dead,
            actor=by,
            reason=why or "(no reason given)",
            details=dict(details or {}),
        )
        if seq is not None and count == 0:
            entry = await queries.entry_of(self.store.pool, seq)
            if entry is not None and entry["state"] == "in_doubt":
                raise Refused(NOT_RETRIED_IN_DOUBT.format(seq=seq))
            raise Refused(f"journal entry {seq} does not exist or is not dead")
        return count

    async def journal_resolve(
        self,
        seq: int,
        outcome: str,
        record: str | None,
        by: str,
        reason: str | None,
        details: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """An SRE's word on an entry in doubt, audited: ``not-applied`` (nothing to replay) or
        ``applied`` with ``record``, the id of the record a create made (read back from the
        authoritative side and replayed by the resolver)."""
        why = require_reason(reason)
        check_actor(by)
        check_seq(seq)
        if outcome not in ("applied", "not-applied"):
            raise UsageError("say whether it was 'applied' or 'not-applied'")
        applied = outcome == "applied"
        if not applied and record is not None:
            raise UsageError("--record goes with 'applied' (the record the create made)")
        entry = await queries.entry_of(self.store.pool, seq)
        if entry is None:
            raise Refused(f"journal entry {seq} does not exist")
        if entry["state"] != "in_doubt":
            raise Refused(
                f"journal entry {seq} is {entry['state'].replace('_', ' ')}, not in doubt: "
                "only an entry whose outcome is unknown is resolved"
            )
        token = named = None
        if applied:
            token, named = self._named(entry, record)
        try:
            dataset = await queries.resolve(
                self.store.pool,
                seq,
                applied=applied,
                actor=by,
                reason=why,
                record=token,
                named=named,
                details=dict(details or {}),
            )
        except IllegalTransition as exc:
            raise Refused(str(exc)) from None
        return {"resolved": seq, "dataset": dataset, "as": outcome}

    def _named(self, entry: dict[str, Any], record: str | None) -> tuple[str, bytes]:
        """The token and the sealed id of the record an in-doubt create made."""
        seq, dataset = entry["seq"], entry["dataset"]
        if entry["record"] != DATASET_WIDE:
            raise Refused(
                f"journal entry {seq} names its record: the resolver settles it by reading "
                "that record back from the authoritative side, applied or not, and it stays "
                f"in doubt only while that fails (last error: {entry['last_error'] or 'none'});"
                " resolve it not-applied, or skip it"
            )
        naming = self.naming
        if naming is None:
            raise UsageError("naming the record a create made is not available here")
        route = naming.routes.get((entry["route"], entry["method"]))
        if route is None or route.create_id is None or route.replay_as is None:
            raise Refused(
                f"journal entry {seq} is a dataset-wide write that creates no record: what it "
                "wrote cannot be read back; resolve it not-applied, or skip it (opens the "
                "other side's gap until a verification closes it)"
            )
        if record is None or not record.strip():
            raise UsageError(
                "name the record this create made: --record ID (its id on the authoritative "
                "side); or resolve it not-applied, or skip it"
            )
        check_text("record", record)
        if naming.namer is None or naming.sealer is None:
            raise UsageError(
                "naming a record needs BASCULE_HMAC_KEY and BASCULE_JOURNAL_KEY here (or go "
                "through a proxy's admin API: --admin URL)"
            )
        made = record_named(naming.router, naming.namer, dataset, route, record.strip())
        if made is None:
            raise UsageError(
                f"--record: not an id of a {dataset} record (as the route {route.replay_as} "
                "reads it)"
            )
        sealed = naming.sealer.seal(
            orjson.dumps({NAMED: {"id": record.strip()}}), dataset=dataset, field="answer"
        )
        return made.token, sealed

    async def journal_skip(
        self, seq: int, by: str, reason: str | None, details: Mapping[str, Any] | None = None
    ) -> str:
        """Give up replaying an entry, audited; its dataset."""
        check_seq(seq)
        why = require_reason(reason)
        check_actor(by)
        try:
            return await queries.skip(
                self.store.pool, seq, actor=by, reason=why, details=dict(details or {})
            )
        except IllegalTransition as exc:
            raise Refused(str(exc)) from None

    async def noise_decide(
        self,
        dataset: str,
        pointer: str,
        accept: bool,
        by: str,
        reason: str | None,
        route: str | None,
        details: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        noise = self._noise()
        min_pairs = pairs_needed(self.noise_pairs, dataset)
        if route is not None:
            check_text("route", route)
        return await noise.decide(
            dataset, pointer, accept, reason, by, route, min_pairs=min_pairs, details=details
        )

    async def refresh_figures(self) -> None:
        """The figures the gauges report (``bascule/metrics.py``), read from the state
        database now: each dataset's stage, journal backlog, and the gate of its next move
        where one applies (``shadow`` and past it, ``target`` excepted)."""
        rows = await self.store.all()
        journal = await queries.backlog(self.store.pool)
        gates: dict[str, dict[str, bool]] = {}
        if self.gate is not None:
            for name, row in rows.items():
                if Stage.SHADOW.position <= row.stage.position < Stage.TARGET.position:
                    report = await self.gate.judge(row)
                    gates[name] = {c.name: c.ok for c in report.conditions}
        metrics.figures.stages = {name: row.stage.value for name, row in rows.items()}
        metrics.figures.journal = {n: journal.get(n, queries.EMPTY_BACKLOG) for n in rows}
        metrics.figures.gates = gates
        metrics.figures.at = metrics.now()

    def _noise(self) -> NoiseStore:
        if self.noise_store is None:
            raise StoreError("noise proposals are not available on this replica")
        return self.noise_store
