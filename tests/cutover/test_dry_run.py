"""A dry run refuses every move the real one refuses, and changes nothing: one test per refusal.

Each case builds the state that makes a real move refuse, makes sure the real move does refuse
(nothing changed), then asks for a dry run of the same move from the same state: it must say
"refused", for the same reason, and change nothing either (no stage, no audit, no fence held).
The dry run goes through the switcher's steps with side effects off (``cutover/switch.py``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from bascule.config import IdAllocation, SwitchSettings
from bascule.errors import (
    BasculeError,
    IllegalMove,
    Refused,
    StaleVersion,
    UnknownDataset,
    UsageError,
)
from bascule.sealing import Sealer, fence_id
from bascule.stages import GapOpen, Side, Stage
from bascule.state.journal import Journal
from bascule.state.stage_store import StageRow, StageStore
from cutover import controller
from cutover.controller import MoveResult
from cutover.switch import Switcher
from refapi.lab import walk
from tests.harness import closed_port_url

QUICK = SwitchSettings(hold=0.5, small_backlog=2, backlog_wait=0.3, confirm_wait=0.3)
IDS = {"dcir": IdAllocation(table="dcir", sequence="dcir_id_seq")}


class Quiet:
    async def announce(self, row: StageRow) -> bool:
        return True


@dataclass
class World:
    url: str
    pool: asyncpg.Pool
    store: StageStore
    switcher: Switcher

    async def at(self, dataset: str, *stages: Stage) -> None:
        """Set up a stage through the store directly (the mechanism, whatever the rules)."""
        await walk(self.store, dataset, *stages, actor="setup")

    async def shadow_with_target_verified(self, dataset: str = "dcir") -> None:
        await self.at(dataset, Stage.DUALWRITE)
        await self.store.close_gap(dataset, Side.TARGET, actor="setup", reason="verified")
        await self.at(dataset, Stage.SHADOW)

    async def entry(self, state: str, *, orphan: bool = False, record: str = "r") -> None:
        journal = Journal(self.pool, Sealer(bytes(32)), "t")
        async with journal.locked("dcir", [record]) as session:
            seq = await session.intent(
                record=record, route="/r", method="PUT", authority="source", stage_version=1,
                request={},
            )  # fmt: skip
            if orphan:
                session.conn.terminate()  # the writer dies before recording the outcome
                return
        await journal.decide(seq, state, dataset="dcir")  # type: ignore[arg-type]

    async def snapshot(self) -> tuple[Any, ...]:
        return (await self.store.all(), await self.store.history())


@pytest.fixture
async def world(pg_url: str, state_pool: asyncpg.Pool) -> World:
    return World(pg_url, state_pool, StageStore(state_pool), Switcher(state_pool, QUICK, ids=IDS))


Move = Callable[[bool], Awaitable[MoveResult]]


def stage(world: World, dataset: str, wanted: Stage, **kw: Any) -> Move:
    kw = {"actor": "sre", "reason": "CHG-1", "switcher": world.switcher, **kw}
    return lambda dry_run: controller.move(
        world.store, Quiet(), dataset, wanted, dry_run=dry_run, **kw
    )


def rollback(world: World, dataset: str, to: Stage | None) -> Move:
    return lambda dry_run: controller.rollback(
        world.store,
        Quiet(),
        dataset,
        to=to,
        actor="sre",
        reason="CHG-1",
        switcher=world.switcher,
        dry_run=dry_run,
    )


async def refused_both_ways(
    world: World, move: Move, error: type[BasculeError], needle: str
) -> MoveResult | None:
    """The real move raises ``error`` naming ``needle``; its dry run refuses for the same
    reason; neither changes anything. Returns the dry run's result (None when the dry run
    raised, as a move refused before any rule is assessed does)."""
    before = await world.snapshot()
    with pytest.raises(error, match=needle):
        await move(False)
    assert await world.snapshot() == before
    try:
        dry = await move(True)
    except error as exc:
        assert re.search(needle, str(exc))
        assert await world.snapshot() == before
        return None
    assert (dry.dry_run, dry.allowed, dry.after) == (True, False, None)
    assert dry.refusal is not None and re.search(needle, dry.refusal), dry.refusal
    assert await world.snapshot() == before
    return dry


async def test_a_dry_run_of_an_allowed_switch_is_allowed_and_says_what_it_found(
    world: World,
) -> None:
    """The control: without any of the causes below, the dry run of shadow -> live is allowed
    (no DSN configured for ids: the step says so), and the real move then goes ahead."""
    await world.shadow_with_target_verified()
    plain = Switcher(world.pool, QUICK)  # no ids configured
    dry = await controller.move(
        world.store, Quiet(), "dcir", Stage.LIVE, actor="sre", reason=None, dry_run=True,
        switcher=plain,
    )  # fmt: skip
    assert dry.allowed, dry.refusal
    found = " | ".join(dry.done)
    for needle in (
        "no write left by a dead replica",
        "backlog toward the new authority small now (0 < 2)",
        "writes in flight now: none",
        "no id allocation configured",
        "live replicas that would confirm",
    ):
        assert needle in found, needle
    real = await controller.move(
        world.store, Quiet(), "dcir", Stage.LIVE, actor="sre", reason="go", switcher=plain
    )
    assert real.after is not None and real.after.stage is Stage.LIVE


async def test_skipping_a_stage(world: World) -> None:
    await refused_both_ways(
        world, stage(world, "dcir", Stage.SHADOW), IllegalMove, "one stage at a time"
    )


async def test_moving_to_the_stage_it_is_at(world: World) -> None:
    await refused_both_ways(
        world, stage(world, "dcir", Stage.SOURCE), IllegalMove, "it is already there"
    )


async def test_rolling_back_from_the_first_stage(world: World) -> None:
    await refused_both_ways(
        world, rollback(world, "dcir", None), IllegalMove, "already at the first stage"
    )


async def test_a_rollback_that_goes_forward(world: World) -> None:
    await refused_both_ways(
        world,
        rollback(world, "dcir", Stage.DUALWRITE),
        IllegalMove,
        "a rollback moves to an earlier stage",
    )


async def test_exposing_a_side_with_an_open_gap(world: World) -> None:
    await world.at("dcir", Stage.DUALWRITE)
    await refused_both_ways(
        world, stage(world, "dcir", Stage.SHADOW), GapOpen, "the target has had an open gap"
    )


async def test_an_unknown_dataset(world: World) -> None:
    await refused_both_ways(world, stage(world, "nope", Stage.DUALWRITE), UnknownDataset, "nope")


async def test_a_version_that_changed_meanwhile(world: World) -> None:
    await refused_both_ways(
        world,
        stage(world, "dcir", Stage.DUALWRITE, expected_version=7),
        StaleVersion,
        "version",
    )


async def test_no_one_named_as_making_the_change(world: World) -> None:
    await refused_both_ways(
        world, stage(world, "dcir", Stage.DUALWRITE, actor=" "), UsageError, "must be named"
    )


async def test_a_write_left_by_a_replica_that_died(world: World) -> None:
    await world.entry("intent", orphan=True)
    dry = await refused_both_ways(
        world, stage(world, "dcir", Stage.DUALWRITE), Refused, "left by a replica that died"
    )
    assert dry is not None and dry.checks[-1].name == "switch" and not dry.checks[-1].ok


async def test_writes_in_doubt_before_an_authority_switch(world: World) -> None:
    await world.shadow_with_target_verified()
    await world.entry("in_doubt")
    await refused_both_ways(world, stage(world, "dcir", Stage.LIVE), Refused, "1 in doubt")


async def test_dead_writes_before_an_authority_switch(world: World) -> None:
    await world.shadow_with_target_verified()
    await world.entry("pending")
    async with world.pool.acquire() as conn:
        await conn.execute("UPDATE bascule_journal SET state = 'dead'")
    await refused_both_ways(world, stage(world, "dcir", Stage.LIVE), Refused, "1 dead")


async def test_a_backlog_that_does_not_shrink(world: World) -> None:
    await world.shadow_with_target_verified()
    for record in ("a", "b", "c"):  # small_backlog is 2; no replayer runs here
        await world.entry("pending", record=record)
    dry = await refused_both_ways(
        world, stage(world, "dcir", Stage.LIVE), Refused, "backlog toward the new authority is 3"
    )
    assert dry is not None and "would wait up to 0.3 s" in (dry.refusal or "")


async def test_writes_in_flight_that_never_finish(world: World) -> None:
    """A replica frozen mid-write holds the fence shared: the real move waits ``hold`` and
    gives up; the dry run names the session that has held it longer than that."""
    writer = await asyncpg.connect(
        world.url, server_settings={"application_name": "bascule writer frozen:1"}
    )
    try:
        await writer.execute("SELECT pg_advisory_lock_shared($1)", fence_id("dcir"))
        await asyncio.sleep(QUICK.hold + 0.2)  # idle with the fence for longer than `hold`
        dry = await refused_both_ways(
            world,
            stage(world, "dcir", Stage.DUALWRITE),
            Refused,
            "writes in flight (did not finish|have held the fence)",
        )
        assert dry is not None and "bascule writer frozen:1" in (dry.refusal or "")
    finally:
        await writer.close()


async def test_ids_to_move_with_no_backend_database(world: World) -> None:
    await world.shadow_with_target_verified()
    await refused_both_ways(
        world, stage(world, "dcir", Stage.LIVE), Refused, "needs both backends' `database` DSNs"
    )


async def test_ids_to_move_on_a_backend_database_that_does_not_answer(world: World) -> None:
    await world.shadow_with_target_verified()
    dead = closed_port_url().replace("http://", "postgresql://postgres@") + "/x"
    world.switcher.databases = {"source": dead, "target": dead}
    await refused_both_ways(
        world, stage(world, "dcir", Stage.LIVE), Refused, "cannot move the target's ids"
    )


@pytest.fixture(autouse=True)
async def _no_fence_left(world: World) -> AsyncIterator[None]:
    """After every case, the fence is free: a dry run never holds it, a refused move let it go."""
    yield
    async with world.pool.acquire() as conn:
        await conn.execute("SET lock_timeout = '200ms'")
        await conn.execute("SELECT pg_advisory_lock($1)", fence_id("dcir"))
        await conn.execute("SELECT pg_advisory_unlock_all()")
