"""A create left in doubt holds back only what must wait for it, and an SRE can settle it
(issue 16, item 2).

A POST the source applied but answered 504 (a gateway's timeout) is in doubt: the id of the
record it made is unknown. It used to hold back every later write of its dataset, until an SRE
skipped it; `journal retry` refused it and the skip was the only way out. Now later writes
naming their record (and later creates, named by their answers) replay at once; only later
dataset-wide writes wait. The resolver settles it by re-sending it under the researcher's own
idempotency key where the backend honours them, and then reads the record it made back (its
current state, never the first answer); otherwise an SRE says what happened, audited:
`journal resolve SEQ applied --record ID`, `journal resolve SEQ not-applied`, or `journal skip`,
which opens the other side's gap.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from bascule.errors import Refused
from bascule.stages import Side, Stage
from bascule.state import audit
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageStore
from refapi.lab import AUTH
from tests.conftest import Ground
from tests.harness import Forward, Hook, dcir_record
from tests.world import Hooks, World, amount, build_world, table_digest

pytestmark = pytest.mark.timeout(120)


def posts_lost(first: int) -> Hook:
    """A backend that commits everything, but answers 504 instead of its answer to its first
    ``first`` POSTs."""
    lost: list[str] = []

    async def hook(request: web.Request, forward: Forward) -> web.StreamResponse:
        answer = await forward()
        if request.method == "POST" and len(lost) < first:
            lost.append(request.path)
            return web.Response(status=504, text="gateway timeout")
        return answer

    return hook


async def counts(world: World) -> dict[str, int]:
    rows = await world.sql(
        world.state_db, "SELECT state, count(*) AS n FROM bascule_journal GROUP BY state"
    )
    return {r["state"]: r["n"] for r in rows}


async def until(world: World, wanted: dict[str, int], within: float = 20.0) -> dict[str, int]:
    deadline = time.monotonic() + within
    while (found := await counts(world)) != wanted:
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.1)
    return found


async def in_doubt(world: World) -> list[int]:
    rows = await world.sql(
        world.state_db, "SELECT seq FROM bascule_journal WHERE state = 'in_doubt' ORDER BY seq"
    )
    return [r["seq"] for r in rows]


async def ids(db: str) -> set[int]:
    return {r["id"] for r in await asyncpg_fetch(db, "SELECT id FROM dcir")}


async def asyncpg_fetch(db: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def write(
    session: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any], **headers: str
) -> int:
    async with session.request(method, url, json=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_a_create_in_doubt_holds_back_only_dataset_wide_writes_and_an_sre_names_it(
    ground: Ground,
) -> None:
    async with build_world(ground, hooks=Hooks(source=posts_lost(1))) as world:
        await world.to_stage(Stage.DUALWRITE)
        base = f"{world.proxy}/v1/datasets/dcir/records"
        async with aiohttp.ClientSession(headers=AUTH) as session:
            # The source applies the create; its answer is lost (no key: it is never re-sent).
            assert await write(session, "POST", base, dcir_record(900)) == 504
            [doubt] = await in_doubt(world)
            # Later writes: two records that existed before, and another create.
            assert await write(session, "PATCH", f"{base}/3", {"amount": 33}) == 200
            assert await write(session, "PATCH", f"{base}/4", {"amount": 44}) == 200
            assert await write(session, "POST", base, dcir_record(901)) == 201
        # None of them waits for the create in doubt.
        await until(world, {"in_doubt": 1, "applied": 3})
        assert await amount(world.target_db, 3) == Decimal(33)
        [made] = await ids(world.source_db) - await ids(world.target_db)

        ops = world.replica.admin_deps().ops
        # `journal retry` is for dead entries: it says what to do with one in doubt.
        with pytest.raises(Refused, match=r"resolve .* applied --record ID"):
            await ops.journal_retry(doubt, False, "sre", "try again")
        # A create resolved as applied needs the record it made.
        with pytest.raises(Exception, match="--record ID"):
            await ops.journal_resolve(doubt, "applied", None, "sre", "found it")
        done = await ops.journal_resolve(doubt, "applied", str(made), "sre", "found on the source")
        assert done == {"resolved": doubt, "dataset": "dcir", "as": "applied"}
        # The resolver reads the record back from the source and replays it.
        await until(world, {"applied": 4})
        assert await table_digest(world.source_db) == await table_digest(world.target_db)
        pool = await open_pool(world.state_db, max_size=1)
        try:
            last = (await audit.history(pool, "dcir"))[-1]
        finally:
            await pool.close()
        # Audited, with what the SRE said, never the record's id.
        assert (last.action, last.actor, last.reason) == (
            "journal-resolve",
            "sre",
            "found on the source",
        )
        assert last.details == {"seq": doubt, "was": "in_doubt", "as": "applied"}, last.details


async def test_a_create_in_doubt_resolved_not_applied_or_skipped_which_opens_the_gap(
    ground: Ground,
) -> None:
    async with build_world(ground, hooks=Hooks(source=posts_lost(2))) as world:
        await world.to_stage(Stage.DUALWRITE)
        pool = await open_pool(world.state_db, max_size=2)
        store = StageStore(pool)
        try:
            # The target was seeded like the source: its gap is closed.
            await store.close_gap("dcir", Side.TARGET, actor="t", reason="seeded identically")
            base = f"{world.proxy}/v1/datasets/dcir/records"
            async with aiohttp.ClientSession(headers=AUTH) as session:
                assert await write(session, "POST", base, dcir_record(900)) == 504
                assert await write(session, "POST", base, dcir_record(901)) == 504
            first, second = await in_doubt(world)
            ops = world.replica.admin_deps().ops
            with pytest.raises(Exception, match="goes with 'applied'"):
                await ops.journal_resolve(first, "not-applied", "7", "sre", "x")
            await ops.journal_resolve(first, "not-applied", None, "sre", "the source lacks it")
            with pytest.raises(Refused, match="not in doubt"):
                await ops.journal_resolve(first, "not-applied", None, "sre", "again")
            assert (await store.get("dcir")).gaps.get(Side.TARGET) is None
            await ops.journal_skip(second, "sre", "cannot tell which record it made")
            # The target may lack what the skipped create made: its gap is open.
            assert (await store.get("dcir")).gaps.get(Side.TARGET) is not None
            history = await audit.history(pool, "dcir")
        finally:
            await pool.close()
        assert await counts(world) == {"rejected": 1, "skipped": 1}
        actions = [(r.action, r.details.get("as"), r.details.get("gap_opened")) for r in history]
        assert actions[-2:] == [
            ("journal-resolve", "not-applied", None),
            ("journal-skip", None, True),
        ], actions


async def create_timed_out(
    world: World, session: aiohttp.ClientSession, base: str, key: str
) -> int:
    """In `dualwrite`, a create with Idempotency-Key ``key`` that the source applied and
    answered 504 to: the id of the record it made there (and not on the target)."""
    await world.to_stage(Stage.DUALWRITE)
    created = await write(session, "POST", base, dcir_record(900), **{"Idempotency-Key": key})
    assert created == 504
    [made] = await ids(world.source_db) - await ids(world.target_db)
    return made


def resend_refused_until(ready: asyncio.Event) -> Hook:
    """A backend that applies the first POST and answers 504; a POST re-sent under the same
    idempotency key is answered 503 without reaching it until ``ready`` is set."""
    seen: set[str] = set()

    async def hook(request: web.Request, forward: Forward) -> web.StreamResponse:
        key = request.headers.get("Idempotency-Key")
        if request.method == "POST" and key is not None:
            if key not in seen:
                seen.add(key)
                await forward()
                return web.Response(status=504, text="gateway timeout")
            if not ready.is_set():
                return web.Response(status=503, text="busy")
        return await forward()

    return hook


async def test_a_create_settled_by_its_key_replays_its_records_current_state(
    ground: Ground,
) -> None:
    """Red team: writes to the record a create in doubt made are replayed before it is settled
    (they no longer wait for it); the re-send's answer is the create's *first* answer, and
    replayed after them it would undo them on the target. It is settled by reading the record
    back instead."""
    ready = asyncio.Event()
    async with build_world(
        ground, hooks=Hooks(source=resend_refused_until(ready)), idempotent_creates=True
    ) as world:
        base = f"{world.proxy}/v1/datasets/dcir/records"
        async with aiohttp.ClientSession(headers=AUTH) as session:
            made = await create_timed_out(world, session, base, "k1")
            # The researcher found the record it made, and changes it: replayed at once.
            assert await write(session, "PATCH", f"{base}/{made}", {"amount": 555}) == 200
            await until(world, {"in_doubt": 1, "applied": 1})
            assert await amount(world.target_db, made) == Decimal(555)
        ready.set()  # the re-send reaches the source: its first answer comes back
        await until(world, {"applied": 2})
        assert await amount(world.target_db, made) == Decimal(555)
        assert await table_digest(world.source_db) == await table_digest(world.target_db)


def record_read_refused_until(ready: asyncio.Event) -> Hook:
    """A backend that applies the first POST and answers 504, answers a re-sent one, and
    answers 503 to reading a single record back until ``ready`` is set."""
    seen: set[str] = set()

    async def hook(request: web.Request, forward: Forward) -> web.StreamResponse:
        key = request.headers.get("Idempotency-Key")
        if request.method == "POST" and key is not None and key not in seen:
            seen.add(key)
            await forward()
            return web.Response(status=504, text="gateway timeout")
        if request.method == "GET" and request.path.count("/") == 5 and not ready.is_set():
            return web.Response(status=503, text="busy")
        return await forward()

    return hook


async def test_a_create_whose_record_is_known_holds_its_later_writes_until_settled(
    ground: Ground,
) -> None:
    """Red team: the re-send told the record the create made, but reading it back fails for a
    while. Named after its record at once, the create holds back that record's later writes
    meanwhile (replayed first, their state would be overwritten by the older one read back)."""
    ready = asyncio.Event()
    async with build_world(
        ground, hooks=Hooks(source=record_read_refused_until(ready)), idempotent_creates=True
    ) as world:
        base = f"{world.proxy}/v1/datasets/dcir/records"
        async with aiohttp.ClientSession(headers=AUTH) as session:
            made = await create_timed_out(world, session, base, "k2")
            deadline = time.monotonic() + 20
            while True:  # the resolver re-sent it and named it after its record
                rows = await world.sql(world.state_db, "SELECT record, state FROM bascule_journal")
                if rows and rows[0]["record"] != "*":
                    break
                assert time.monotonic() < deadline, rows
                await asyncio.sleep(0.1)
            assert rows[0]["state"] == "in_doubt"
            assert await write(session, "PATCH", f"{base}/{made}", {"amount": 777}) == 200
            await asyncio.sleep(1.5)  # several replayer and resolver rounds
            assert await counts(world) == {"in_doubt": 1, "pending": 1}
            assert await amount(world.target_db, made) is None
        ready.set()
        await until(world, {"applied": 2})
        assert await amount(world.target_db, made) == Decimal(777)
        assert await table_digest(world.source_db) == await table_digest(world.target_db)
