"""The resolver's idempotent re-send: a create whose answer was lost, on a route declaring
``idempotent_backend``, is settled by re-sending it under the researcher's own key — and only
then; without a key, or on a route that does not declare it, it stays in doubt."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from bascule.sealing import DATASET_WIDE
from bascule.stages import Stage
from proxy.resolver import ORPHANED
from refapi.lab import AUTH
from tests.conftest import Ground
from tests.harness import Forward, Hook, dcir_record
from tests.world import Hooks, World, build_world, table_digest


def first_answer_lost() -> Hook:
    """A backend that commits everything, but answers 504 instead of its answer to the
    *first* POST it gets."""
    lost: list[str] = []

    async def hook(request: web.Request, forward: Forward) -> web.StreamResponse:
        answer = await forward()
        if request.method == "POST" and not lost:
            lost.append(request.path)
            return web.Response(status=504, text="gateway timeout")
        return answer

    return hook


async def journal_states(pg_url: str) -> list[str]:
    conn = await asyncpg.connect(pg_url)
    try:
        return [r["state"] for r in await conn.fetch("SELECT state FROM bascule_journal")]
    finally:
        await conn.close()


async def create_through(world: World, key: str | None) -> int:
    headers = {"Idempotency-Key": key} if key else {}
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.post(
            f"{world.proxy}/v1/datasets/dcir/records", json=dcir_record(900), headers=headers
        ) as resp:
            await resp.read()
            return resp.status


async def settled(world: World, within: float = 10.0) -> dict[str, int]:
    deadline = time.monotonic() + within
    while True:
        counts = await world.drained()
        if not counts.get("in_doubt") or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.2)


@pytest.mark.parametrize(
    ("declared", "key", "resolved"),
    [
        (True, "researcher-key-1", True),
        (True, None, False),  # no key: a re-send could create what the researcher saw fail
        (False, "researcher-key-2", False),  # the route does not say the backend is idempotent
    ],
)
async def test_a_create_whose_answer_was_lost_is_resent_under_its_key_only_when_safe(
    ground: Ground, declared: bool, key: str | None, resolved: bool
) -> None:
    async with build_world(
        ground, hooks=Hooks(source=first_answer_lost()), idempotent_creates=declared
    ) as world:
        await world.to_stage(Stage.DUALWRITE)
        before = (await table_digest(world.source_db))[0]
        assert await create_through(world, key) == 504  # the source committed; answer lost
        assert (await table_digest(world.source_db))[0] == before + 1
        if resolved:
            counts = await settled(world)
            assert counts == {"applied": 1}, counts
            # Applied once on the source (the re-send got the first answer back), and the
            # target holds the same row with the same server-assigned id.
            assert (await table_digest(world.source_db))[0] == before + 1
            assert await table_digest(world.source_db) == await table_digest(world.target_db)
        else:
            await asyncio.sleep(2.0)  # several resolver rounds
            assert await journal_states(world.state_db) == ["in_doubt"]
            assert (await table_digest(world.source_db))[0] == before + 1  # never re-sent
            assert (await table_digest(world.target_db))[0] == before


async def test_an_orphaned_create_is_never_resent(ground: Ground) -> None:
    """Its writer died before recording the answer, which may have been a refusal owed to the
    researcher (403, 409): a re-send under the service credential would make it a write."""
    async with build_world(
        ground,
        idempotent_creates=True,
        orphan_grace=0.0,
        read_timeout=1.0,
    ) as world:
        await world.to_stage(Stage.DUALWRITE)
        before = (await table_digest(world.source_db))[0]
        journal = world.replica.dual.journal  # type: ignore[union-attr]
        body = orjson.dumps(dcir_record(901))
        with contextlib.suppress(Exception):
            async with journal.locked("dcir", [DATASET_WIDE]) as session:
                await session.intent(
                    record=DATASET_WIDE,
                    route="/v1/datasets/{dataset}/records",
                    method="POST",
                    authority="source",
                    stage_version=2,
                    request={
                        "method": "POST",
                        "target": "/v1/datasets/dcir/records",
                        "key": None,
                        "headers": [
                            ["Content-Type", "application/json"],
                            ["Idempotency-Key", "k9"],
                        ],
                        "body": base64.b64encode(body).decode(),
                    },
                )
                session.conn.terminate()  # the writer dies with the request maybe sent
        backend = world.replica.config.source_backend
        await asyncio.sleep(backend.connect_timeout + backend.read_timeout + 2.0)
        rows = await journal.pool.fetch("SELECT state, last_error FROM bascule_journal")
        assert [(r["state"], r["last_error"]) for r in rows] == [("in_doubt", ORPHANED)]
        assert (await table_digest(world.source_db))[0] == before  # never re-sent
