"""A replica's readiness shows a Redis behind a silent partition (issue 16, item 5).

A blackholed Redis answers nothing and closes nothing: the stage listener, waiting for
announcements, saw no error and /readyz said Redis was fine throughout. The listener now PINGs
Redis after a second of silence and counts it away when no answer comes within a few seconds;
the replica stays ready (it polls the stages from Postgres: Redis only makes a flip quicker).
And a flip's announcement, or any other Redis command of a replica, fails after a bound instead
of hanging on a connection gone silent.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from bascule.stages import Stage
from tests.conftest import Ground
from tests.world import Hooks, build_world

pytestmark = pytest.mark.timeout(90)

WITHIN = 20.0
"""Seconds the readiness may take to show it, loosely (PING after 1 s, answer within 3 s)."""


async def redis_state(session: aiohttp.ClientSession, admin: str) -> tuple[int, dict[str, Any]]:
    async with session.get(f"{admin}/readyz") as resp:
        detail = await resp.json()
        return resp.status, detail


async def until_redis(session: aiohttp.ClientSession, admin: str, ok: bool) -> dict[str, Any]:
    deadline = time.monotonic() + WITHIN
    while True:
        status, detail = await redis_state(session, admin)
        if detail["redis"]["ok"] is ok:
            assert status == 200, detail  # ready either way: the stages come from Postgres
            return detail
        assert time.monotonic() < deadline, detail
        await asyncio.sleep(0.1)


async def test_readiness_shows_a_redis_behind_a_silent_partition(ground: Ground) -> None:
    async with build_world(
        ground, stages=(Stage.DUALWRITE,), hooks=Hooks(faults={"redis"})
    ) as world:
        line, admin = world.faults["redis"], world.admin_urls[0]
        async with aiohttp.ClientSession() as session:
            await until_redis(session, admin, True)
            assert await world.replica.redis.ping()  # its pooled connection, open before the cut
            line.blackhole()
            cut_at = time.monotonic()
            detail = await until_redis(session, admin, False)
            seen = time.monotonic() - cut_at
            assert "did not answer a PING" in detail["redis"]["last_error"], detail
            # A flip through this replica's admin API announces it on the replica's own
            # Redis connection, silent now: it fails in a bound instead of hanging the flip,
            # and says that the replicas will poll (this one confirms it from Postgres).
            ops = world.replica.admin_deps().ops
            async with asyncio.timeout(30):
                result = await ops.stage("dcir", "source", "sre", "CHG-2 flip, Redis silent")
            assert result["announced"] is False, result
            assert "every live replica confirmed it" in result["done"], result
            # The line back: the listener subscribes again, and says so.
            line.reset()
            line.heal()
            await until_redis(session, admin, True)
    print(f"\nRedis blackholed: /readyz showed it away after {seen:.1f} s")
