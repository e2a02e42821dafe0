"""Changes that alter writes, on real Postgres: the exclusive write fence, the authority-switch
barrier (backlog, drain, ids), and replica confirmations under leases."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from bascule.config import IdAllocation, SwitchSettings
from bascule.errors import Refused
from bascule.sealing import Sealer, fence_id
from bascule.stages import Side, Stage
from bascule.state import replicas
from bascule.state.journal import Journal
from bascule.state.stage_store import StageRow, StageStore
from bascule.tasks import spawn
from cutover import controller
from cutover.switch import Switcher
from refapi.lab import walk

QUICK = SwitchSettings(hold=1.0, small_backlog=10, backlog_wait=1.0, confirm_wait=1.0)


async def at(store: StageStore, *stages: Stage) -> StageRow:
    return await walk(store, "dcir", *stages, actor="t")


def committing(store: StageStore, row: StageRow, to: Stage) -> Callable[[], Awaitable[StageRow]]:
    return lambda: store.change("dcir", row.version, to, actor="t", reason="t")


async def pending_entry(state_pool: asyncpg.Pool, state: str = "pending") -> int:
    journal = Journal(state_pool, Sealer(bytes(32)), "t")
    async with journal.locked("dcir", ["r"]) as session:
        seq = await session.intent(
            record="r", route="/r", method="PUT", authority="source", stage_version=1, request={}
        )
    await journal.decide(seq, state, dataset="dcir")  # type: ignore[arg-type]
    return seq


async def test_a_change_that_alters_writes_waits_for_writes_in_flight(
    state_pool: asyncpg.Pool,
) -> None:
    store = StageStore(state_pool)
    row = await store.get("dcir")
    writer = await state_pool.acquire()
    await writer.execute("SELECT pg_advisory_lock_shared($1)", fence_id("dcir"))  # in flight
    switcher = Switcher(state_pool, QUICK)
    started = time.monotonic()
    change = spawn(
        switcher.change("dcir", row, Stage.DUALWRITE, committing(store, row, Stage.DUALWRITE)),
        name="change",
    )
    await asyncio.sleep(0.3)
    assert not change.done()  # held back by the write in flight
    assert (await store.get("dcir")).stage is Stage.SOURCE
    await writer.execute("SELECT pg_advisory_unlock_all()")
    await state_pool.release(writer)
    after, outcome = await change
    assert after.stage is Stage.DUALWRITE and time.monotonic() - started >= 0.3
    assert any("took the write fence" in step for step in outcome.steps)
    # Released: a new write takes the fence at once.
    async with state_pool.acquire() as conn:
        await conn.execute("SET lock_timeout = '100ms'")
        await conn.execute("SELECT pg_advisory_lock_shared($1)", fence_id("dcir"))
        await conn.execute("SELECT pg_advisory_unlock_all()")


async def test_a_write_that_never_finishes_makes_the_change_give_up(
    state_pool: asyncpg.Pool,
) -> None:
    store = StageStore(state_pool)
    row = await store.get("dcir")
    async with state_pool.acquire() as writer:
        await writer.execute("SET application_name = 'bascule writer host-a:4242'")
        await writer.execute("SELECT pg_advisory_lock_shared($1)", fence_id("dcir"))
        with pytest.raises(
            Refused,
            match=r"did not finish within 1 s \(held by bascule writer host-a:4242 \(1\)\)",
        ):
            await Switcher(state_pool, QUICK).change(
                "dcir", row, Stage.DUALWRITE, committing(store, row, Stage.DUALWRITE)
            )
        await writer.execute("SELECT pg_advisory_unlock_all()")
    assert await store.get("dcir") == row  # nothing committed


async def test_the_authority_switch_waits_for_the_backlog_to_drain(
    state_pool: asyncpg.Pool,
) -> None:
    store = StageStore(state_pool)
    row = await at(store, Stage.DUALWRITE, Stage.SHADOW)
    seq = await pending_entry(state_pool)
    switcher = Switcher(state_pool, QUICK)
    with pytest.raises(Refused, match="did not drain within 1 s"):  # no replayer here
        await switcher.change("dcir", row, Stage.LIVE, committing(store, row, Stage.LIVE))
    assert (await store.get("dcir")).stage is Stage.SHADOW
    change = spawn(
        switcher.change("dcir", row, Stage.LIVE, committing(store, row, Stage.LIVE)), name="change"
    )
    await asyncio.sleep(0.3)
    await state_pool.execute("UPDATE bascule_journal SET state = 'applied' WHERE seq = $1", seq)
    after, outcome = await change
    assert after.stage is Stage.LIVE
    assert "backlog toward the new authority drained to zero" in outcome.steps


async def test_the_authority_switch_refuses_what_would_never_drain(
    state_pool: asyncpg.Pool,
) -> None:
    store = StageStore(state_pool)
    row = await at(store, Stage.DUALWRITE, Stage.SHADOW)
    await pending_entry(state_pool, "in_doubt")
    with pytest.raises(Refused, match="1 in doubt and 0 dead"):
        await Switcher(state_pool, QUICK).change(
            "dcir", row, Stage.LIVE, committing(store, row, Stage.LIVE)
        )
    assert (await store.get("dcir")).stage is Stage.SHADOW


async def test_the_new_authority_allocates_ids_past_the_other_sides(
    state_pool: asyncpg.Pool, make_database: Callable[[str], Awaitable[str]]
) -> None:
    dbs: dict[str, str | None] = {
        "source": await make_database("ids_src"),
        "target": await make_database("ids_tgt"),
    }
    for side, top in (("source", 500), ("target", 12)):
        conn = await asyncpg.connect(dbs[side])
        try:
            await conn.execute("CREATE TABLE dcir (id bigserial PRIMARY KEY)")
            await conn.execute(
                "INSERT INTO dcir SELECT nextval('dcir_id_seq') FROM generate_series(1, $1)", top
            )
            # The source's latest record was deleted: its id was seen, and is never reused.
            await conn.execute("DELETE FROM dcir WHERE id = $1", top)
        finally:
            await conn.close()
    store = StageStore(state_pool)
    row = await at(store, Stage.DUALWRITE, Stage.SHADOW)
    switcher = Switcher(
        state_pool,
        QUICK,
        ids={"dcir": IdAllocation(table="dcir", sequence="dcir_id_seq")},
        databases=dbs,
    )
    await switcher.change("dcir", row, Stage.LIVE, committing(store, row, Stage.LIVE))
    conn = await asyncpg.connect(dbs["target"])
    try:
        assert await conn.fetchval("SELECT nextval('dcir_id_seq')") == 501
    finally:
        await conn.close()


async def test_a_change_waits_for_live_replicas_and_not_for_expired_ones(
    state_pool: asyncpg.Pool,
) -> None:
    store = StageStore(state_pool)
    row = await store.get("dcir")
    await replicas.report(state_pool, "alive", {"dcir": row.version}, lease=30.0)
    await replicas.report(state_pool, "frozen", {"dcir": row.version}, lease=0.5)
    await asyncio.sleep(0.6)  # the frozen replica's lease ran out
    after, outcome = await Switcher(state_pool, QUICK).change(
        "dcir", row, Stage.DUALWRITE, committing(store, row, Stage.DUALWRITE)
    )
    # Neither reported the new version; it waited only for the live one, and names both (the
    # frozen one still serves reads on its last stages).
    assert outcome.lagging == ["alive", "frozen"]
    alive = {r["name"]: r["lease_alive"] for r in outcome.unconfirmed}
    assert alive == {"alive": True, "frozen": False}
    await replicas.report(state_pool, "alive", {"dcir": after.version}, lease=30.0)
    assert await replicas.lagging(state_pool, "dcir", after.version) == []
    listed = {r.name: r.alive for r in await replicas.listing(state_pool)}
    assert listed == {"alive": True, "frozen": False}


async def test_a_move_through_the_controller_takes_the_fence_and_says_so(
    state_pool: asyncpg.Pool,
) -> None:
    store = StageStore(state_pool)
    announced: list[int] = []

    class Heard:
        async def announce(self, row: StageRow) -> bool:
            announced.append(row.version)
            return True

    switcher = Switcher(state_pool, QUICK)
    result = await controller.move(
        store, Heard(), "dcir", Stage.DUALWRITE, actor="t", reason="r", switcher=switcher
    )
    assert result.after is not None and result.announced and announced == [result.after.version]
    assert result.after.write_epoch == result.before.write_epoch + 1
    assert result.done[0].startswith("took the write fence")
    assert "every live replica confirmed it" in result.done
    # A change that does not alter writes takes no fence.
    await store.close_gap("dcir", Side.TARGET, actor="t", reason="r")
    quiet = await controller.move(
        store, Heard(), "dcir", Stage.SHADOW, actor="t", reason="r", switcher=switcher
    )
    assert quiet.done == () and quiet.after is not None
    assert quiet.after.write_epoch == result.after.write_epoch


async def test_a_write_left_by_a_dead_replica_makes_the_change_wait(
    state_pool: asyncpg.Pool,
) -> None:
    store = StageStore(state_pool)
    row = await store.get("dcir")
    journal = Journal(state_pool, Sealer(bytes(32)), "t")
    async with journal.locked("dcir", ["r"]) as session:
        await session.intent(
            record="r", route="/r", method="PUT", authority="source", stage_version=1, request={}
        )
        session.conn.terminate()  # the writer dies before recording the outcome
    with pytest.raises(Refused, match="1 write\\(s\\) left by a replica that died"):
        await Switcher(state_pool, QUICK).change(
            "dcir", row, Stage.DUALWRITE, committing(store, row, Stage.DUALWRITE)
        )
    assert await store.get("dcir") == row
