"""The stage store on real Postgres: compare-and-set, audit in the same transaction, history."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bascule.errors import IllegalMove, SchemaError, StaleVersion, UnknownDataset, UsageError
from bascule.stages import Side, Stage
from bascule.state import schema
from bascule.state.postgres import open_pool, vacuum_check
from bascule.state.stage_store import StageRow, StageStore
from cutover import controller
from refapi.lab import migrate_state


class Recorder:
    def __init__(self) -> None:
        self.rows: list[StageRow] = []

    async def announce(self, row: StageRow) -> bool:
        self.rows.append(row)
        return True


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[StageStore]:
    await migrate_state(pg_url)
    pool = await open_pool(pg_url)
    yield StageStore(pool)
    await pool.close()


async def test_registered_datasets_start_at_source_with_an_audit_row(store: StageStore) -> None:
    rows = await store.all()
    assert {r.stage for r in rows.values()} == {Stage.SOURCE}
    assert {r.version for r in rows.values()} == {1}
    history = await store.history()
    assert [(h.dataset, h.action, h.to_stage) for h in history if h.dataset == "dcir"] == [
        ("dcir", "register", "source")
    ]
    assert await store.register(["dcir", "newone"], actor="t") == ["newone"]


async def test_a_move_changes_stage_and_audit_together(store: StageStore) -> None:
    rec = Recorder()
    result = await controller.move(
        store, rec, "dcir", Stage.DUALWRITE, actor="alice", reason="start dual write"
    )
    assert result.after is not None and result.after.version == 2
    assert rec.rows == [result.after]
    row = await store.get("dcir")
    assert (row.stage, row.version, row.updated_by, row.reason) == (
        Stage.DUALWRITE,
        2,
        "alice",
        "start dual write",
    )
    last = (await store.history("dcir"))[-1]
    assert (last.action, last.actor, last.from_stage, last.to_stage, last.reason) == (
        "stage",
        "alice",
        "source",
        "dualwrite",
        "start dual write",
    )
    assert (last.from_version, last.to_version) == (1, 2)


async def test_refusals_change_nothing(store: StageStore) -> None:
    rec = Recorder()
    before = await store.all()
    audit_before = await store.history()
    with pytest.raises(IllegalMove, match="one stage at a time"):
        await controller.move(store, rec, "dcir", Stage.LIVE, actor="a", reason="skip")
    with pytest.raises(UnknownDataset, match="unknown dataset 'nope'; known datasets: cepidc"):
        await controller.move(store, rec, "nope", Stage.DUALWRITE, actor="a", reason="x")
    with pytest.raises(UsageError, match="a reason is required"):
        await controller.move(store, rec, "dcir", Stage.DUALWRITE, actor="a", reason="  ")
    with pytest.raises(IllegalMove, match="already at the first stage"):
        await controller.rollback(store, rec, "dcir", to=None, actor="a", reason="x")
    assert await store.all() == before
    assert await store.history() == audit_before
    assert rec.rows == []


async def test_rollback_goes_back_any_number_of_stages(store: StageStore) -> None:
    rec = Recorder()
    await controller.move(store, rec, "dcir", Stage.DUALWRITE, actor="a", reason="forward")
    await controller.close_gap(store, "dcir", Side.TARGET, actor="a", reason="verified")
    for stage in (Stage.SHADOW, Stage.LIVE):
        await controller.move(store, rec, "dcir", stage, actor="a", reason="forward")
    result = await controller.rollback(store, rec, "dcir", to=None, actor="b", reason="oops")
    assert result.after is not None and result.after.stage is Stage.SHADOW
    result = await controller.rollback(
        store, rec, "dcir", to=Stage.SOURCE, actor="b", reason="all the way"
    )
    assert result.after is not None and result.after.stage is Stage.SOURCE
    with pytest.raises(IllegalMove, match="a rollback moves to an earlier stage"):
        await controller.rollback(store, rec, "pmsi", to=Stage.DUALWRITE, actor="b", reason="x")
    assert [h.action for h in await store.history("dcir")][-2:] == ["rollback", "rollback"]


async def test_concurrent_changes_from_one_version_exactly_one_wins(store: StageStore) -> None:
    row = await store.get("dcir")

    async def attempt(who: str) -> str:
        try:
            await store.change("dcir", row.version, Stage.DUALWRITE, actor=who, reason=who)
            return who
        except StaleVersion:
            return ""

    results = await asyncio.gather(*(attempt(f"sre{i}") for i in range(8)))
    winners = [w for w in results if w]
    assert len(winners) == 1
    changes = [h for h in await store.history("dcir") if h.action == "stage"]
    assert [(h.actor, h.from_version, h.to_version) for h in changes] == [(winners[0], 1, 2)]
    assert (await store.get("dcir")).version == 2


async def test_the_vacuum_check_says_when_the_state_postgres_does_not_vacuum(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The journal leaves two dead row versions per write: a server with autovacuum off never
    # reclaims them. A replica runs this check at start (not every CLI command: SREs would read
    # it on each). This machine's server runs without autovacuum; elsewhere, the other branch.
    pool = await open_pool(pg_url, max_size=1)
    try:
        await migrate_state(pg_url)
        vacuums = await pool.fetchval("SHOW autovacuum") == "on"
        with caplog.at_level(logging.WARNING, "bascule.state"):
            await vacuum_check(pool)
    finally:
        await pool.close()
    assert ("autovacuum is off on the state Postgres" in caplog.text) is not vacuums


async def test_schema_check_names_what_to_run(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        with pytest.raises(SchemaError, match="run `bascule migrate"):
            await schema.check(conn)
        assert [m.version for m in await schema.migrate(conn)] == list(range(1, schema.LATEST + 1))
        assert await schema.migrate(conn) == []  # idempotent
        await schema.check(conn)
        await conn.execute("INSERT INTO bascule_schema (version, name) VALUES (999, 'future')")
        with pytest.raises(SchemaError, match="newer than this bascule knows"):
            await schema.check(conn)
    finally:
        await conn.close()
