"""The write fence: every write reads its plan from the stage under its dataset's fence, never
from the replica's own (possibly stale) view, and a change that holds the fence exclusively
waits for writes in flight and holds new ones back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import pytest

from bascule.sealing import fence_id
from bascule.stages import Stage
from bascule.state.journal.entries import IllegalTransition
from bascule.tasks import spawn
from refapi.lab import AUTH
from tests.conftest import Ground
from tests.world import World, amount, build_world, table_digest


@pytest.fixture
async def world(ground: Ground) -> AsyncIterator[World]:
    async with build_world(ground) as built:
        yield built


def freeze_view(world: World, stage: Stage) -> None:
    """This replica believes ``dcir`` is at ``stage``, whatever the stores say (a replica that
    missed the announcement and has not polled yet)."""
    view = world.replica.view
    stale = view.get("dcir")
    assert stale is not None
    frozen = replace(stale, stage=stage)
    view.get = lambda dataset: frozen if dataset == "dcir" else view.stages.get(dataset)  # type: ignore[method-assign]


async def patch(world: World, rid: int, value: int) -> int:
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.patch(
            f"{world.proxy}/v1/datasets/dcir/records/{rid}", json={"amount": value}
        ) as resp:
            await resp.read()
            return resp.status


async def test_a_replica_with_a_stale_view_still_journals_a_dual_write(world: World) -> None:
    freeze_view(world, Stage.SOURCE)
    await world.to_stage(Stage.DUALWRITE, seen_by=())  # the stores say dualwrite
    assert await patch(world, 4, 404) == 200
    assert (await world.drained()).get("applied") == 1  # journaled, then replayed
    assert await amount(world.target_db, 4) == Decimal(404)
    assert await table_digest(world.source_db) == await table_digest(world.target_db)


async def test_a_replica_with_a_stale_view_writes_to_the_new_authority(world: World) -> None:
    await world.to_stage(Stage.DUALWRITE, Stage.SHADOW)
    freeze_view(world, Stage.SHADOW)
    await world.to_stage(Stage.LIVE, seen_by=())  # the target is now authoritative
    assert await patch(world, 5, 505) == 200
    await world.drained()
    assert await amount(world.target_db, 5) == Decimal(505)
    assert await amount(world.source_db, 5) == Decimal(505)  # by replay from the target
    conn = await asyncpg.connect(world.state_db)
    try:
        assert await conn.fetchval("SELECT authority FROM bascule_journal") == "target"
    finally:
        await conn.close()


async def test_a_replica_that_believes_in_dual_write_after_a_rollback_writes_one_side(
    world: World,
) -> None:
    freeze_view(world, Stage.DUALWRITE)  # the stores say source (a rollback it has not seen)
    assert await patch(world, 9, 909) == 200
    assert await amount(world.source_db, 9) == Decimal(909)
    assert await amount(world.target_db, 9) != Decimal(909)
    conn = await asyncpg.connect(world.state_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM bascule_journal") == 0
    finally:
        await conn.close()


async def test_a_change_holding_the_fence_holds_writes_and_they_follow_it(world: World) -> None:
    freeze_view(world, Stage.SOURCE)
    flip = await asyncpg.connect(world.state_db)
    try:
        # A change that alters writes: the fence exclusively, waiting for writes in flight.
        await flip.execute("SELECT pg_advisory_lock($1)", fence_id("dcir"))
        started = time.monotonic()
        write = spawn(patch(world, 6, 606), name="held write")
        await asyncio.sleep(0.5)
        assert not write.done()  # held back by the fence
        await world.to_stage(Stage.DUALWRITE, seen_by=())
        await flip.execute("SELECT pg_advisory_unlock($1)", fence_id("dcir"))
        assert await write == 200
        assert time.monotonic() - started >= 0.5
    finally:
        await flip.close()
    # Planned after the change: journaled and replayed, though this replica's view said source.
    assert (await world.drained()).get("applied") == 1
    assert await amount(world.target_db, 6) == Decimal(606)


async def test_an_outcome_is_refused_under_another_write_epoch(world: World) -> None:
    await world.to_stage(Stage.DUALWRITE)
    journal = world.replica.dual.journal  # type: ignore[union-attr]
    with pytest.raises(IllegalTransition):
        async with journal.locked("dcir", ["r"]) as session:
            fenced = await session.plan(record="r", route="/r", method="PUT", request=dict)
            assert fenced.seq is not None and fenced.stage == "dualwrite"
            # Only a change holding the fence exclusively moves the epoch; were the fence ever
            # lost, the outcome check still refuses to record under the new epoch.
            await journal.pool.execute(
                "UPDATE bascule_stage SET write_epoch = write_epoch + 1 WHERE dataset = 'dcir'"
            )
            await session.decide(fenced.seq, "pending", status=200, fenced=True)
    state = await journal.pool.fetchval("SELECT state FROM bascule_journal")
    assert state == "intent"  # an orphan now, for the resolver: never recorded as pending


async def test_a_write_that_found_a_newer_stage_refreshes_its_replica(world: World) -> None:
    view = world.replica.view
    await view.stop()  # no poll, no Redis: only the write itself can tell this replica
    before = view.get("dcir")
    assert before is not None and before.stage is Stage.SOURCE
    await world.to_stage(Stage.DUALWRITE, seen_by=())
    assert await patch(world, 7, 707) == 200
    after = view.get("dcir")
    # Refreshed before the answer: the researcher's next read here is planned on it.
    assert after is not None and after.stage is Stage.DUALWRITE


async def test_a_write_whose_outcome_is_refused_still_gets_its_answer(ground: Ground) -> None:
    async with build_world(ground) as world:
        await world.to_stage(Stage.DUALWRITE)
        journal = world.replica.dual.journal  # type: ignore[union-attr]
        original = journal._move

        async def epoch_moved(*args: Any, **kwargs: Any) -> None:
            # What the fence prevents: the write epoch moving while this write is in flight.
            await journal.pool.execute(
                "UPDATE bascule_stage SET write_epoch = write_epoch + 1 WHERE dataset = 'dcir'"
            )
            await original(*args, **kwargs)

        journal._move = epoch_moved  # type: ignore[method-assign]
        assert await patch(world, 8, 808) == 200  # the source applied it: the answer goes back
        journal._move = original  # type: ignore[method-assign]
        assert await amount(world.source_db, 8) == Decimal(808)
        state = await journal.pool.fetchval("SELECT state FROM bascule_journal")
        assert state == "intent"  # an orphan for the resolver, never recorded under the new epoch
