"""Acceptance: a flip made with the CLI reaches three proxy processes, with the stores up, with
Redis stopped, emptied or restarted, and with the state Postgres stopped.

The state stores here are embedded ones of this module's own, so they can really be stopped
and started again without disturbing any other test; the reference APIs' databases live on the
shared test server.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from bascule.state.servers import EmbeddedPostgres, EmbeddedRedis, create_database
from refapi.lab import AUTH, OPERATOR_TOKEN, VIEWER_TOKEN
from tests.conftest import Ground
from tests.world import MakeWorld, World, build_world

# The heavy fleet tests share one worker: two at once would exceed the server's connections.
pytestmark = [pytest.mark.timeout(180), pytest.mark.xdist_group("fleet")]


@dataclass
class OwnStores:
    postgres: EmbeddedPostgres
    redis: EmbeddedRedis


@pytest.fixture(scope="module")
def own() -> Iterator[OwnStores]:
    root = Path(tempfile.mkdtemp(prefix="bt-fleet-"))
    stores = OwnStores(EmbeddedPostgres(root), EmbeddedRedis(root))
    stores.postgres.start()
    stores.redis.start()
    yield stores
    stores.redis.stop()
    stores.postgres.stop()


@pytest.fixture
def own_up(own: OwnStores) -> Iterator[OwnStores]:
    """The module's stores, running at the start of the test and again after it."""
    for server in (own.postgres, own.redis):
        if not _answers(server.port):
            server.start()
    yield own
    for server in (own.postgres, own.redis):
        if not _answers(server.port):
            server.start()


def _answers(port: int) -> bool:
    from bascule.state.servers import port_answers

    return port_answers("127.0.0.1", port)


async def served_by(fleet: World, session: aiohttp.ClientSession, dataset: str) -> list[str]:
    async def one(url: str) -> str:
        async with session.get(f"{url}/v1/datasets/{dataset}/records/1") as resp:
            assert resp.status == 200, await resp.text()
            return resp.headers["X-Served-By"]

    return list(await asyncio.gather(*(one(u) for u in fleet.proxies)))


async def wait_all(
    fleet: World, session: aiohttp.ClientSession, dataset: str, name: str, within: float
) -> float:
    """Seconds until every proxy serves ``dataset`` from ``name``; fails past ``within``."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await served_by(fleet, session, dataset) == [name] * len(fleet.proxies):
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"{dataset} not served by {name} everywhere within {within}s")


@pytest.fixture
async def fleet_factory(own_up: OwnStores, ground: Ground) -> AsyncIterator[MakeWorld]:
    async with AsyncExitStack() as stack:

        async def make(poll_interval: float) -> World:
            """Three `bascule proxy` processes over reference APIs on 20 identical rows; the
            state stores are the module's own."""
            name = f"fleet_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
            state = await create_database(own_up.postgres.url, name, replace=True)
            return await stack.enter_async_context(
                build_world(
                    ground,
                    replicas=3,
                    processes=True,
                    rows=20,
                    seed=1,
                    postgres_url=state,
                    redis_url=own_up.redis.url,
                    poll_interval=poll_interval,
                    env={
                        "BASCULE_ADMIN_TOKEN": OPERATOR_TOKEN,
                        "BASCULE_VIEWER_TOKEN": VIEWER_TOKEN,
                    },
                )
            )

        yield make


def _flip(fleet: World, dataset: str, *stages: str) -> None:
    """Move through ``stages``; after ``dualwrite``, close the target's gap (both sides were
    seeded identically) so that ``shadow`` is allowed."""
    for stage in stages:
        done = fleet.cli("stage", dataset, stage, "--reason", f"test to {stage}", "--by", "ci")
        assert done.returncode == 0, done.stderr
        if stage == "dualwrite":
            _close_target_gap(fleet, dataset)


def _close_target_gap(fleet: World, dataset: str) -> None:
    reason = "both sides seeded identically by the test"
    done = fleet.cli("gap", "close", dataset, "target", "--reason", reason, "--by", "ci")
    assert done.returncode == 0, done.stderr


async def test_a_flip_reaches_three_proxies_fast_with_redis_up(fleet_factory: MakeWorld) -> None:
    # Polls every 5 s: reaching all three well within that proves the pub/sub path works.
    fleet = await fleet_factory(poll_interval=5.0)
    async with aiohttp.ClientSession(headers=AUTH) as session:
        assert await served_by(fleet, session, "dcir") == ["azure"] * 3
        _flip(fleet, "dcir", "dualwrite", "shadow")
        await wait_all(fleet, session, "dcir", "azure", within=1.0)
        _flip(fleet, "dcir", "live")
        took = await wait_all(fleet, session, "dcir", "scaleway", within=2.0)
        print(f"flip reached 3 proxies in {took * 1000:.0f} ms (poll interval 5 s)")
        assert took < 2.0
        assert await served_by(fleet, session, "pmsi") == ["azure"] * 3
    status = fleet.cli("status", "dcir", "--json")
    assert status.returncode == 0 and '"stage": "live"' in status.stdout


async def test_with_redis_stopped_flips_arrive_by_polling_and_nobody_sees_an_error(
    fleet_factory: MakeWorld, own_up: OwnStores
) -> None:
    fleet = await fleet_factory(poll_interval=0.5)
    async with aiohttp.ClientSession(headers=AUTH) as session:
        own_up.redis.stop()
        for _ in range(20):  # researchers keep being served
            assert await served_by(fleet, session, "dcir") == ["azure"] * 3
        done = fleet.cli("stage", "dcir", "dualwrite", "--reason", "redis down", "--by", "ci")
        assert done.returncode == 0, done.stderr
        assert "replicas will pick it up by polling" in done.stdout
        _close_target_gap(fleet, "dcir")
        _flip(fleet, "dcir", "shadow", "live")
        took = await wait_all(fleet, session, "dcir", "scaleway", within=3.0)
        print(f"flip reached 3 proxies by polling in {took * 1000:.0f} ms (poll 0.5 s)")
        own_up.redis.start()
        await asyncio.sleep(1.5)  # listeners reconnect
        _flip(fleet, "pmsi", "dualwrite", "shadow", "live")
        await wait_all(fleet, session, "pmsi", "scaleway", within=2.0)


async def test_with_postgres_stopped_proxies_serve_last_stages_and_flips_are_refused(
    fleet_factory: MakeWorld, own_up: OwnStores
) -> None:
    fleet = await fleet_factory(poll_interval=0.5)
    async with aiohttp.ClientSession(headers=AUTH) as session:
        _flip(fleet, "dcir", "dualwrite", "shadow", "live")
        await wait_all(fleet, session, "dcir", "scaleway", within=3.0)
        own_up.postgres.stop()
        await asyncio.sleep(1.2)  # several polls fail
        for _ in range(10):
            assert await served_by(fleet, session, "dcir") == ["scaleway"] * 3
            assert await served_by(fleet, session, "pmsi") == ["azure"] * 3
        async with session.get(fleet.admin_urls[0] + "/readyz") as resp:
            detail = await resp.json()
            assert resp.status == 200
            assert detail["serving_last_known_stages"] is True
            assert detail["postgres"]["ok"] is False
        refused = fleet.cli("stage", "pmsi", "dualwrite", "--reason", "pg down", "--by", "ci")
        assert refused.returncode == 1
        assert "state Postgres is unreachable" in refused.stderr
        # Through the admin API too: a clear 503, nothing changed.
        async with session.post(
            fleet.admin_urls[1] + "/v1/datasets/pmsi/stage",
            json={"stage": "dualwrite", "reason": "pg down"},
            headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        ) as resp:
            assert resp.status == 503
            assert "nothing was changed" in (await resp.json())["error"]["message"]
        own_up.postgres.start()
        _flip(fleet, "pmsi", "dualwrite", "shadow", "live")
        await wait_all(fleet, session, "pmsi", "scaleway", within=3.0)
        async with session.get(fleet.admin_urls[0] + "/readyz") as resp:
            assert (await resp.json())["serving_last_known_stages"] is False


async def test_redis_emptied_or_restarted_changes_nothing_served(
    fleet_factory: MakeWorld, own_up: OwnStores
) -> None:
    fleet = await fleet_factory(poll_interval=0.5)
    async with aiohttp.ClientSession(headers=AUTH) as session:
        _flip(fleet, "dcir", "dualwrite", "shadow", "live")
        await wait_all(fleet, session, "dcir", "scaleway", within=3.0)
        client = aioredis.Redis.from_url(own_up.redis.url)
        await client.flushall()
        await client.aclose()
        for _ in range(10):
            assert await served_by(fleet, session, "dcir") == ["scaleway"] * 3
            await asyncio.sleep(0.1)
        own_up.redis.stop()
        own_up.redis.start()
        for _ in range(10):
            assert await served_by(fleet, session, "dcir") == ["scaleway"] * 3
            await asyncio.sleep(0.1)
        # And the fast path is back: a rollback arrives well within the poll interval.
        await asyncio.sleep(1.0)
        done = fleet.cli("rollback", "dcir", "--reason", "back", "--by", "ci")
        assert done.returncode == 0, done.stderr
        await wait_all(fleet, session, "dcir", "azure", within=2.0)


def test_cli_entry_point_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bascule", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and "stage" in done.stdout
