"""Writes without credentials can neither fill the journal nor hold writers back (issue 16,
item 3).

Anonymous 10 MB POSTs were journaled with their whole body (sealed, kept for the journal's
retention) while they held the dataset's lock, though the backend refused every one. Now a
write's body is journaled only with an outcome that may be replayed or re-sent; anonymous
writes in flight are bounded per replica (429 past ``[proxy] anonymous_writes``), and refused
before the journal altogether with ``[proxy] require_credentials``. The figures (journal growth,
authenticated p99 under a flood) are ``bench/anonymous_flood.py``'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from bascule.stages import Stage
from bascule.tasks import spawn
from proxy.dualwrite import DualWriter
from refapi.lab import AUTH
from tests.conftest import Ground
from tests.harness import Forward, Hook, dcir_record
from tests.world import Hooks, World, build_world, table_digest

BODY = b'{"pad": "' + b"x" * 200_000 + b'"}'
"""An anonymous write's body: 200 KB (the reference API refuses it, whatever its size)."""


async def journal_rows(world: World) -> list[tuple[str, int | None, int]]:
    rows = await world.sql(
        world.state_db,
        "SELECT state, status, octet_length(request) AS size FROM bascule_journal ORDER BY seq",
    )
    return [(r["state"], r["status"], r["size"]) for r in rows]


def dual(world: World) -> DualWriter:
    assert world.replica.dual is not None
    return world.replica.dual


@pytest.fixture
async def world(ground: Ground) -> AsyncIterator[World]:
    async with build_world(ground, stages=(Stage.DUALWRITE,)) as built:
        yield built


async def test_a_write_the_authority_refuses_leaves_no_body_in_the_journal(world: World) -> None:
    base = f"{world.proxy}/v1/datasets/dcir/records"
    async with aiohttp.ClientSession() as anonymous, aiohttp.ClientSession(headers=AUTH) as auth:
        async with anonymous.post(
            base, data=BODY, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 401, await resp.text()  # the backend's own refusal
        async with auth.post(base, json=dcir_record(900)) as resp:
            assert resp.status == 201, await resp.text()
    await world.drained()
    (refused, _, refused_size), (accepted, _, accepted_size) = await journal_rows(world)
    assert refused == "rejected"
    # Its method, target and headers only (sealed), never its 200 KB.
    assert refused_size < 2_000, refused_size
    # An accepted write's body is journaled with its outcome, and replayed from there.
    assert accepted == "applied" and accepted_size > refused_size
    assert await table_digest(world.source_db) == await table_digest(world.target_db)


def slow_anonymous(release: asyncio.Event) -> Hook:
    """The source holds a write without credentials until ``release`` is set."""

    async def hook(request: web.Request, forward: Forward) -> web.StreamResponse:
        if request.headers.get("Authorization") is None:
            await release.wait()
        return await forward()

    return hook


async def test_anonymous_writes_in_flight_are_bounded_and_can_be_refused_outright(
    ground: Ground,
) -> None:
    release = asyncio.Event()
    async with build_world(
        ground, stages=(Stage.DUALWRITE,), hooks=Hooks(source=slow_anonymous(release))
    ) as world:
        dual(world).anonymous_writes = 1
        base = f"{world.proxy}/v1/datasets/dcir/records"
        async with (
            aiohttp.ClientSession() as anonymous,
            aiohttp.ClientSession(headers=AUTH) as auth,
        ):

            async def anonymous_patch(rid: int) -> int:
                async with anonymous.patch(f"{base}/{rid}", json={"amount": 1}) as resp:
                    await resp.read()
                    return resp.status

            held = spawn(anonymous_patch(3), name="anonymous-write")
            while not await journal_rows(world):
                await asyncio.sleep(0.02)
            # A second anonymous write is refused before the journal, with when to try again.
            async with anonymous.patch(f"{base}/4", json={"amount": 1}) as resp:
                assert resp.status == 429, await resp.text()
                assert resp.headers["X-Bascule-Error"] == "too_many_anonymous_writes"
                assert resp.headers["Retry-After"] == "1"
            # A researcher's write is not held back by it.
            async with auth.patch(f"{base}/5", json={"amount": 55}) as resp:
                assert resp.status == 200, await resp.text()
            release.set()
            assert await held == 401
            # Required credentials: refused before the journal and any lock.
            dual(world).require_credentials = True
            await world.drained()  # the researcher's write replayed: its row moves no more
            before = await journal_rows(world)
            async with anonymous.patch(f"{base}/4", json={"amount": 1}) as resp:
                body = await resp.json()
                assert resp.status == 401, body
                assert body["error"]["code"] == "credentials_required", body
            assert await journal_rows(world) == before
            async with auth.patch(f"{base}/5", json={"amount": 56}) as resp:
                assert resp.status == 200, await resp.text()
        await world.drained()
        assert await table_digest(world.source_db) == await table_digest(world.target_db)
