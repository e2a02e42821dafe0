"""The controller's rounds on real Postgres: it promotes when the gate holds and auto_promote is
on, rolls live back past its mismatch budget and turns auto_promote off, never flaps, and only
the replica holding its lease acts."""

from __future__ import annotations

import asyncio

from bascule.config import GateSettings
from bascule.stages import Stage
from bascule.state import leases
from cutover.autopilot import LEASE, Autopilot
from cutover.gate import Gate
from cutover.switch import Switcher
from tests.cutover.conftest import ROUTE, Gated, led

SETTINGS = GateSettings(min_compared=5, window=60, replay_grace=5)


class Heard:
    def __init__(self) -> None:
        self.versions: list[int] = []

    async def announce(self, row: object) -> bool:
        self.versions.append(getattr(row, "version", 0))
        return True


def pilot(world: Gated, replica: str = "r1", *, auto: bool = True, budget: int = 0) -> Autopilot:
    return Autopilot(
        world.store,
        Heard(),
        Switcher(world.pool),
        Gate(world.pool, {"dcir": SETTINGS}),
        replica,
        auto_promote={"dcir": auto},
        budgets={"dcir": budget},
        interval=0.1,
        lease=1.0,
    )


async def test_it_promotes_once_the_gate_holds_and_only_with_auto_promote(gated: Gated) -> None:
    assert await led(pilot(gated, auto=False)) == []  # auto_promote off: never
    await gated.sql("UPDATE bascule_stage SET updated_at = now()")  # the window not yet passed
    assert await led(pilot(gated)) == []
    assert (await gated.store.get("dcir")).stage is Stage.SHADOW
    await gated.sql("UPDATE bascule_stage SET updated_at = now() - interval '2 minutes'")
    done = await led(pilot(gated))
    assert [(a.dataset, a.did) for a in done] == [("dcir", "promoted")]
    row = await gated.store.get("dcir")
    assert row.stage is Stage.LIVE
    last = (await gated.store.history("dcir"))[-1]
    assert (last.actor, last.reason) == ("controller", "auto_promote: the gate holds")
    assert last.details["gate"]["volume"] == 10 and last.details["auto_promote"] is True


async def test_past_the_budget_it_rolls_back_turns_auto_promote_off_and_does_not_flap(
    gated: Gated,
) -> None:
    auto = pilot(gated, budget=1)
    await led(auto)
    assert (await gated.store.get("dcir")).stage is Stage.LIVE
    await gated.mismatch()
    assert await led(auto) == []  # within the budget of 1
    await gated.mismatch()
    done = await led(auto)
    assert [(a.dataset, a.did) for a in done] == [("dcir", "rolled back")]
    row = await gated.store.get("dcir")
    assert (row.stage, row.auto_promote) == (Stage.SHADOW, False)
    history = await gated.store.history("dcir")
    off, back = history[-2], history[-1]
    assert (off.action, off.actor, off.details["now"]) == ("auto-promote", "controller", False)
    assert (back.action, back.to_stage, back.actor) == ("rollback", "shadow", "controller")
    assert back.details["live_mismatch_budget"] == {
        "mismatches": 2,
        "budget": 1,
        "version": row.version - 1,
        "replica": "r1",
    }
    # The evidence of the new shadow stage would let the gate hold: auto_promote is off.
    await gated.sql("UPDATE bascule_stage SET updated_at = now() - interval '2 minutes'")
    await gated.counted(ROUTE, "compared", 10)
    assert await led(auto) == []
    assert (await gated.store.get("dcir")).stage is Stage.SHADOW


async def test_only_the_replica_holding_the_lease_acts_and_another_takes_over(
    gated: Gated,
) -> None:
    first, second = pilot(gated, "r1"), pilot(gated, "r2")
    assert await leases.take(gated.pool, LEASE, "r2", 1.0)  # r2 holds it, r1 waits
    run = asyncio.gather(first.run(), return_exceptions=True)
    try:
        await asyncio.sleep(0.5)
        assert (await gated.store.get("dcir")).stage is Stage.SHADOW  # r1 did nothing
        assert await leases.holder(gated.pool, LEASE) == "r2"
        # r2 stops renewing (it died): once its lease has run out, r1 takes it and acts.
        for _ in range(50):
            await asyncio.sleep(0.1)
            if (await gated.store.get("dcir")).stage is Stage.LIVE:
                break
        assert (await gated.store.get("dcir")).stage is Stage.LIVE
        assert await leases.holder(gated.pool, LEASE) == "r1"
        assert not await leases.take(gated.pool, LEASE, second.replica, 1.0)
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    assert await leases.holder(gated.pool, LEASE) is None  # a stopping controller lets it go
