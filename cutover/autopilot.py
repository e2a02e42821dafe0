"""The controller: one replica of the fleet, holding a lease, moves datasets on its own.

Every ``[controller] interval`` seconds the replica holding the ``controller`` lease looks at
every dataset:

- in ``shadow`` with ``auto_promote`` on, it moves the dataset to ``live`` once the gate holds
  (the same move, checks and audit as an SRE's, by ``controller``, with the gate's figures);
- in ``live``, once the mismatches found under that stage exceed ``live_mismatch_budget``, it
  rolls the dataset back to ``shadow``, turns its ``auto_promote`` off (audited) and pages.

It never flaps: a dataset it rolled back stays in ``shadow`` until an operator turns
``auto_promote`` back on, and a promotion needs the gate's whole window of evidence, gathered
under the new ``shadow`` stage. A replica that dies stops renewing the lease; another takes it
over once it has expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from bascule.config import Config
from bascule.errors import BasculeError, Refused, StoreError
from bascule.stages import Stage
from bascule.state import leases
from bascule.state.postgres import reaching_postgres
from bascule.state.stage_store import StageRow, StageStore
from cutover import controller
from cutover.controller import Announcer
from cutover.gate import Gate
from cutover.switch import Switcher

log = logging.getLogger("bascule.controller")

ACTOR = "controller"
LEASE = "controller"


@dataclass(frozen=True)
class Action:
    """What one round did to one dataset, for logs and tests."""

    dataset: str
    did: str
    """``promoted``, ``rolled back``, or ``refused`` (the move the rules or the switch
    refused: tried again next round)."""
    detail: str


@dataclass
class Autopilot:
    store: StageStore
    announcer: Announcer
    switcher: Switcher
    gate: Gate
    replica: str
    """This replica's name: the lease's holder."""
    auto_promote: Mapping[str, bool] = field(default_factory=dict)
    """Each configured dataset's ``auto_promote`` (an operator or a rollback may turn it off:
    the stage row says so)."""
    budgets: Mapping[str, int] = field(default_factory=dict)
    """Each configured dataset's ``live_mismatch_budget``."""
    interval: float = 5.0
    lease: float = 15.0
    groups: controller.Groups | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        return self.store.pool

    async def run(self) -> None:
        """Until cancelled: a round every ``interval`` while this replica holds the lease."""
        try:
            while True:
                try:
                    await self.lead()
                except StoreError as exc:
                    log.warning("controller round skipped: %s", exc)
                await asyncio.sleep(self.interval)
        finally:
            with contextlib.suppress(BaseException):
                await asyncio.shield(leases.release(self.pool, LEASE, self.replica))

    async def lead(self) -> list[Action] | None:
        """A round, if this replica holds the controller's lease (taking or renewing it); None
        while another replica does."""
        if not await leases.take(self.pool, LEASE, self.replica, self.lease):
            return None
        return await self.round()

    async def round(self) -> list[Action]:
        """Look at every configured dataset once; what was done. Every move it makes is
        refused at its commit unless this replica still holds the lease then."""
        done: list[Action] = []
        rows = await self.store.all()
        for name in sorted(self.auto_promote):
            row = rows.get(name)
            if row is None:
                continue
            try:
                action = await self._look(row)
            except BasculeError as exc:
                action = Action(name, "refused", str(exc))
                log.warning("controller: %s: %s", name, exc)
            if action is not None:
                done.append(action)
        return done

    def promotes(self, row: StageRow) -> bool:
        """``auto_promote`` as configured, unless the stage row turned it off."""
        if row.auto_promote is not None:
            return row.auto_promote
        return self.auto_promote.get(row.dataset, False)

    async def _look(self, row: StageRow) -> Action | None:
        if row.stage is Stage.SHADOW and self.promotes(row):
            return await self._promote(row)
        if row.stage is Stage.LIVE:
            return await self._watch_live(row)
        return None

    async def _promote(self, row: StageRow) -> Action | None:
        group = self.groups.get(row.dataset) if self.groups else None
        if group is not None:
            rows = {r.dataset: r for r in (await self.store.all()).values()}
            if not all(m in rows and self.promotes(rows[m]) for m in group.members):
                return None  # a member of its group is not to be promoted: none is
        report = await self.gate.judge(row, Stage.LIVE)
        if not report.ok:
            return None  # nothing to do yet: the gate says what it waits for
        result = await controller.move(
            self.store,
            self.announcer,
            row.dataset,
            Stage.LIVE,
            actor=ACTOR,
            reason="auto_promote: the gate holds",
            expected_version=row.version,
            details={"auto_promote": True, "replica": self.replica},
            switcher=self.switcher,
            gate=self.gate,
            groups=self.groups,
            require=self._still(promoting=True),
        )
        detail = f"shadow -> live (version {result.after.version if result.after else '?'})"
        log.info("controller: %s: %s, the gate holding", row.dataset, detail)
        return Action(row.dataset, "promoted", detail)

    async def _watch_live(self, row: StageRow) -> Action | None:
        budget = self.budgets.get(row.dataset, 0)
        found = await mismatches_under(self.pool, row.dataset, row.version)
        if found <= budget:
            return None
        why = f"{found} mismatches in live (version {row.version}) exceed its budget of {budget}"
        # Paging: on-call's alerting watches this logger at ERROR (docs/operations.md).
        log.error("PAGE: controller rolls %s back to shadow: %s", row.dataset, why)
        figures: dict[str, Any] = {
            "mismatches": found,
            "budget": budget,
            "version": row.version,
            "replica": self.replica,
        }
        # Off first, for every dataset that moves back with it: should the rollback be refused
        # (it is tried again next round), nothing promotes it meanwhile.
        group = self.groups.get(row.dataset) if self.groups else None
        for member in group.members if group is not None else (row.dataset,):
            await self.store.set_auto_promote(
                member,
                False,
                actor=ACTOR,
                reason=f"turned off by the automatic rollback of {row.dataset}: {why}",
                details={"live_mismatch_budget": figures},
                # Judged on this round's row: moved since (on-call acted), it is not ours.
                expected_version=row.version if member == row.dataset else None,
            )
        await controller.rollback(
            self.store,
            self.announcer,
            row.dataset,
            to=Stage.SHADOW,
            actor=ACTOR,
            reason=f"automatic rollback: {why}",
            details={"live_mismatch_budget": figures},
            switcher=self.switcher,
            gate=self.gate,
            groups=self.groups,
            expected_version=row.version,
            require=self._still(promoting=False),
        )
        return Action(row.dataset, "rolled back", why)

    def _still(self, *, promoting: bool) -> controller.Require:
        """What must still hold when the move commits, checked on the locked rows: this replica
        still holds the controller's lease (a move may outlast it: another controller may act
        by then), and for a promotion, auto_promote is still on for every dataset moving (an
        operator may have turned it off meanwhile)."""

        async def check(conn: Any, rows: list[StageRow]) -> None:
            held = await conn.fetchval(
                "SELECT holder = $2 AND expires_at > now() FROM bascule_lease WHERE name = $1"
                " FOR SHARE",
                LEASE,
                self.replica,
            )
            if not held:
                raise Refused(
                    f"the controller on {self.replica} no longer holds its lease: it leaves the "
                    "move to the one that does"
                )
            off = [r.dataset for r in rows if promoting and not self.promotes(r)]
            if off:
                raise Refused(f"auto_promote was turned off meanwhile for {', '.join(off)}")

        return check


async def mismatches_under(pool: asyncpg.Pool, dataset: str, version: int) -> int:
    """Mismatches found by reads served under ``version`` of ``dataset``'s stage."""
    async with reaching_postgres():
        found = await pool.fetchval(
            "SELECT count(*) FROM bascule_mismatch WHERE dataset = $1 AND stage_version = $2",
            dataset,
            version,
        )
    return int(found)


def autopilot_for(
    config: Config,
    store: StageStore,
    announcer: Announcer,
    switcher: Switcher,
    gate: Gate,
    replica: str,
) -> Autopilot:
    """The controller a replica runs, from the configuration."""
    return Autopilot(
        store,
        announcer,
        switcher,
        gate,
        replica,
        auto_promote={name: d.auto_promote for name, d in config.datasets.items()},
        budgets={name: d.gate.live_mismatch_budget for name, d in config.datasets.items()},
        interval=config.controller.interval,
        lease=config.controller.lease,
        groups=controller.groups_of(config),
    )
