"""Dual write through one replica, in process: every write journaled, replayed in per-record
order, and both databases identical row by row once the backlog is drained."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from bascule.stages import Side, Stage
from bascule.state.servers import EmbeddedPostgres
from refapi.lab import AUTH, RESEARCHER_TOKEN
from tests.conftest import Ground
from tests.harness import Forward, Hook, dcir_record
from tests.world import LIVE, Hooks, World, build_world, researchers, table_digest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def world(ground: Ground) -> AsyncIterator[World]:
    # The source ignores idempotency keys: a re-sent write would apply twice there.
    async with build_world(ground, source_idem=False) as built:
        yield built


async def test_concurrent_writes_leave_both_sides_identical(world: World) -> None:
    assert await table_digest(world.source_db) == await table_digest(world.target_db)
    await world.to_stage(Stage.DUALWRITE)
    statuses = await researchers(world.proxies, writers=40, ops=15, records=10)
    assert not [s for s in statuses if s >= 500], sorted(set(statuses))
    counts = await world.drained()
    assert counts.get("dead", 0) == 0 and counts.get("in_doubt", 0) == 0, counts
    assert counts.get("applied", 0) > 0
    source, target = await table_digest(world.source_db), await table_digest(world.target_db)
    assert source == target, (source, target)


async def test_in_live_the_target_is_authoritative_and_the_source_follows(world: World) -> None:
    await world.to_stage(*LIVE)
    statuses = await researchers(world.proxies, writers=20, ops=10, records=5)
    assert not [s for s in statuses if s >= 500]
    counts = await world.drained()
    assert counts.get("dead", 0) == 0, counts
    assert await table_digest(world.source_db) == await table_digest(world.target_db)


async def test_creates_get_the_same_id_and_row_on_both_sides(world: World) -> None:
    await world.to_stage(Stage.DUALWRITE)
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.post(
            f"{world.proxy}/v1/datasets/dcir/records", json=dcir_record(4242)
        ) as resp:
            assert resp.status == 201
            created = (await resp.json())["record"]
    await world.drained()
    for db in (world.source_db, world.target_db):
        conn = await asyncpg.connect(db)
        try:
            row = await conn.fetchrow("SELECT * FROM dcir WHERE id = $1", created["id"])
        finally:
            await conn.close()
        assert row is not None and row["patient_id"] == created["patient_id"]
        assert row["created_at"].isoformat().startswith(created["created_at"][:19])
    assert await table_digest(world.source_db) == await table_digest(world.target_db)


async def test_a_create_is_its_records_once_answered_and_holds_no_other_record_back(
    world: World,
) -> None:
    """A create names no record when it is journaled (the backend assigns the id): until its
    answer is known it holds back every later write of the dataset. Once answered, its entry
    is the new record's: a write to another record is replayed while the create waits for
    its own replay, and a write to the new record still waits for the create."""
    await world.to_stage(Stage.DUALWRITE)
    replayer = world.replica.replayer_task
    assert replayer is not None
    replayer.cancel()  # replays are made by hand below
    await asyncio.gather(replayer, return_exceptions=True)
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.post(
            f"{world.proxy}/v1/datasets/dcir/records", json=dcir_record(4243)
        ) as resp:
            assert resp.status == 201
            made = (await resp.json())["record"]["id"]
        for rid in (3, made):
            async with session.patch(
                f"{world.proxy}/v1/datasets/dcir/records/{rid}", json={"amount": 12.5}
            ) as resp:
                assert resp.status == 200
    rows = await world.sql(world.state_db, "SELECT seq, record FROM bascule_journal ORDER BY seq")
    dual = world.replica.dual
    assert dual is not None
    created, other = dual.namer.record("dcir", str(made)), dual.namer.record("dcir", "3")
    assert [r["record"] for r in rows] == [created, other, created]
    # The create's replay is put off (its backend slow, say): the other record's write goes.
    await world.sql(
        world.state_db,
        "UPDATE bascule_journal SET next_attempt_at = now() + interval '1 hour' WHERE seq = $1",
        rows[0]["seq"],
    )
    ready = [e.seq for e in await dual.journal.replayable("dcir", run=16)]
    assert ready == [rows[1]["seq"]]  # not the create, nor the write to what it created


async def compressing(request: web.Request, forward: Forward) -> web.StreamResponse:
    """A backend that gzips every answer whose request accepts it, as many API gateways do."""
    answer = await forward()
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        answer.enable_compression(web.ContentCoding.gzip)
    return answer


async def test_a_backend_that_compresses_its_answers_still_gets_identical_creates(
    ground: Ground,
) -> None:
    async with build_world(ground, hooks=Hooks(source=compressing)) as world:
        await world.to_stage(Stage.DUALWRITE)
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.get(
                f"{world.proxy}/v1/datasets/dcir/records/1", headers={"Accept-Encoding": "gzip"}
            ) as resp:
                assert resp.headers.get("Content-Encoding") == "gzip"  # the relay does compress
            async with session.post(
                f"{world.proxy}/v1/datasets/dcir/records",
                json=dcir_record(4243),
                headers={"Accept-Encoding": "gzip"},
            ) as resp:
                assert resp.status == 201
                assert (await resp.json())["record"]["patient_id"]
        counts = await world.drained()
        assert counts == {"applied": 1}, counts  # the replay read the journaled answer
        assert await table_digest(world.source_db) == await table_digest(world.target_db)


async def test_without_the_journal_a_write_is_refused_and_reads_go_on(
    world: World, pg_url: str
) -> None:
    await world.to_stage(Stage.DUALWRITE)
    await world.replica.journal_pool.close()  # the journal's store is gone for this replica
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.patch(
            f"{world.proxy}/v1/datasets/dcir/records/1", json={"amount": 1}
        ) as resp:
            body = await resp.json()
            assert resp.status == 503 and body["error"]["code"] == "journal_unavailable"
        async with session.get(f"{world.proxy}/v1/datasets/dcir/records/1") as resp:
            assert resp.status == 200
    assert await table_digest(world.source_db) == await table_digest(world.target_db)


def answers_504_after_commit(methods: set[str]) -> Hook:
    """A backend that commits every request, then answers 504 instead of its answer for
    ``methods``."""

    async def hook(request: web.Request, forward: Forward) -> web.StreamResponse:
        answer = await forward()
        if request.method in methods:
            return web.Response(status=504, text="gateway timeout")
        return answer

    return hook


async def test_a_504_after_the_source_committed_is_resolved_and_replayed(ground: Ground) -> None:
    async with build_world(
        ground, hooks=Hooks(source=answers_504_after_commit({"PATCH"}))
    ) as world:
        url, src, tgt = world.proxy, world.source_db, world.target_db
        await world.to_stage(Stage.DUALWRITE)
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.patch(
                f"{url}/v1/datasets/dcir/records/3", json={"amount": 777}
            ) as resp:
                assert resp.status == 504  # the researcher sees what the source's gateway said
        conn = await asyncpg.connect(ground.pg_url)
        try:
            states = [r["state"] for r in await conn.fetch("SELECT state FROM bascule_journal")]
        finally:
            await conn.close()
        assert states in (["in_doubt"], ["pending"], ["applied"])  # the resolver may be quick
        counts = await world.drained()
        deadline = time.monotonic() + 10
        while counts.get("in_doubt") and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            counts = await world.drained()
        assert counts == {"applied": 1}, counts
        # The source committed the PATCH; the target got it through the resolution.
        assert await table_digest(src) == await table_digest(tgt)


async def test_a_write_whose_client_hangs_up_still_lands_on_both_sides(world: World) -> None:
    await world.to_stage(Stage.DUALWRITE)
    body = orjson.dumps({"amount": 321.5})
    port = int(world.proxy.rsplit(":", 1)[1])
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"PATCH /v1/datasets/dcir/records/5 HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {RESEARCHER_TOKEN}\r\n".encode()
        + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    writer.close()  # hang up before any answer
    await asyncio.sleep(0.5)
    counts = await world.drained()
    assert counts == {"applied": 1}, counts
    for db in (world.source_db, world.target_db):
        conn = await asyncpg.connect(db)
        try:
            assert await conn.fetchval("SELECT amount FROM dcir WHERE id = 5") == Decimal("321.50")
        finally:
            await conn.close()
    assert await table_digest(world.source_db) == await table_digest(world.target_db)


@pytest.mark.parametrize(
    ("stages", "down"),
    [
        ((Stage.DUALWRITE,), Side.TARGET),
        ((Stage.DUALWRITE, Stage.SHADOW, Stage.LIVE), Side.SOURCE),  # roles swapped
    ],
)
async def test_the_other_side_down_for_a_while_grows_then_drains_the_backlog(
    world: World, stages: tuple[Stage, ...], down: Side
) -> None:
    await world.to_stage(*stages)
    target = world.replica.upstreams[down]
    real_port = target.port
    target.port = _closed_port()  # the target is unreachable from now on
    await target.close()
    await target.open()
    try:
        statuses = await researchers(world.proxies, writers=10, ops=10, records=10)
        assert not [s for s in statuses if s >= 500]  # researchers notice nothing
        await asyncio.sleep(1.0)
        conn = await asyncpg.connect(world.state_db)
        try:
            pending = await conn.fetchval(
                "SELECT count(*) FROM bascule_journal WHERE state = 'pending'"
            )
        finally:
            await conn.close()
        assert pending > 0  # the backlog grew while the target was away
    finally:
        target.port = real_port
        await target.close()
        await target.open()
    counts = await world.drained()
    assert counts.get("dead", 0) == 0, counts
    assert await table_digest(world.source_db) == await table_digest(world.target_db)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_with_the_state_postgres_stopped_writes_are_refused_and_reads_served(
    ground: Ground,
) -> None:
    state_pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="bt-state-")))
    state_url = state_pg.start()  # the state store of our own, to really stop
    try:
        async with build_world(ground, postgres_url=state_url) as world:
            url, src, tgt = world.proxy, world.source_db, world.target_db
            await world.to_stage(Stage.DUALWRITE)
            before = await table_digest(src)
            state_pg.stop()
            async with aiohttp.ClientSession(headers=AUTH) as session:
                for i in range(5):
                    async with session.patch(
                        f"{url}/v1/datasets/dcir/records/{i + 1}", json={"amount": 1}
                    ) as resp:
                        body = await resp.json()
                        assert resp.status == 503, body
                        assert body["error"]["code"] == "journal_unavailable"
                        assert "refused before reaching any backend" in body["error"]["message"]
                    async with session.get(f"{url}/v1/datasets/dcir/records/{i + 1}") as resp:
                        assert resp.status == 200  # reads are served all along
                assert await table_digest(src) == before  # nothing accepted unjournaled
                state_pg.start()
                deadline = time.monotonic() + 15
                while True:
                    async with session.patch(
                        f"{url}/v1/datasets/dcir/records/1", json={"amount": 2}
                    ) as resp:
                        if resp.status == 200:
                            break
                        assert time.monotonic() < deadline, await resp.text()
                    await asyncio.sleep(0.2)
            counts = await world.drained()
            assert counts.get("dead", 0) == 0, counts
            assert await table_digest(src) == await table_digest(tgt)
    finally:
        state_pg.stop()
