"""A replica partitioned from its state Postgres — packets dropped both ways, nothing closed,
as across a network partition — goes not ready once its stages are older than
``[state] stale_after``, and refuses a researcher's write with a clear error in a bounded
time, before reaching any backend; the other replica, whose line is fine, goes on."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from bascule.stages import Stage
from bascule.tasks import spawn
from refapi.lab import AUTH
from tests.conftest import Ground
from tests.world import Hooks, amount, build_world

pytestmark = pytest.mark.timeout(120)

POLL, STALE = 0.5, 2.0
BOUND = 30.0
"""Seconds a researcher may wait for the refusal at most: generous (the write's own lock
statement may wait its timeout on a silent session), but far from a hang."""


async def patch(session: aiohttp.ClientSession, url: str, rid: int, value: int) -> Any:
    """(status, X-Bascule-Error, JSON body) of a PATCH of dcir record ``rid``."""
    async with session.patch(
        f"{url}/v1/datasets/dcir/records/{rid}", json={"amount": value}
    ) as resp:
        return resp.status, resp.headers.get("X-Bascule-Error"), await resp.json()


async def not_ready_after(session: aiohttp.ClientSession, admin: str, since: float) -> Any:
    """Poll ``admin``'s /readyz until it answers 503: (seconds since ``since``, its detail)."""
    while True:
        async with session.get(f"{admin}/readyz") as resp:
            detail = await resp.json()
            if resp.status == 503:
                return time.monotonic() - since, detail
        assert time.monotonic() - since < BOUND, detail
        await asyncio.sleep(0.05)


# After the outage the replayer expires its pool's sessions; asyncpg then closes a blackholed
# one in a task of its own, which times out (the close cannot reach the server): expected here,
# and only that.
@pytest.mark.background_failures_expected(match=r"\(Connection\.close\): TimeoutError")
async def test_a_replica_blackholed_from_the_state_postgres_goes_not_ready_and_refuses_writes(
    ground: Ground,
) -> None:
    async with build_world(
        ground,
        replicas=2,
        stages=(Stage.DUALWRITE,),
        hooks=Hooks(faults={"postgres"}, faulted=(1,)),
        poll_interval=POLL,
        stale_after=STALE,
    ) as world:
        line = world.faults["postgres"]
        cut, other = world.proxies[1], world.proxies[0]
        async with aiohttp.ClientSession(headers=AUTH) as session:
            # Through the line, replica 1 journals writes (its sessions stay open in its pools).
            assert (await patch(session, cut, 5, 501))[0] == 200
            assert line.accepted > 0

            line.blackhole()
            cut_at = time.monotonic()
            readiness = spawn(
                not_ready_after(session, world.admin_urls[1], cut_at), name="readyz-watch"
            )
            async with asyncio.timeout(BOUND + 10):  # a hang fails here, not at the suite's
                status, code, body = await patch(session, cut, 5, 502)
            refused_after = time.monotonic() - cut_at
            stale_after, detail = await readiness

            # Not ready, because its stages went stale.
            assert detail["ready"] is False and detail["stale"] is True, detail
            assert stale_after >= STALE - POLL, stale_after
            # Refused with bascule's own error, saying why, before reaching any backend.
            assert (status, code) == (503, "journal_unavailable"), body
            assert body["error"]["code"] == "journal_unavailable", body
            assert "refused before reaching any backend" in body["error"]["message"], body
            assert refused_after < BOUND, refused_after
            assert await amount(world.source_db, 5) == Decimal(501)
            # A write arriving once the replica knows it is cut off is refused at once, not
            # after waiting out a silent session's timeouts.
            asked = time.monotonic()
            status, code, body = await patch(session, cut, 5, 503)
            at_once = time.monotonic() - asked
            assert (status, code) == (503, "journal_unavailable"), body
            assert "has not read the stages" in body["error"]["message"], body
            assert at_once < 1.0, at_once

            # The other replica's line is fine: ready, and its writes go through.
            async with session.get(f"{world.admin_urls[0]}/readyz") as resp:
                assert resp.status == 200, await resp.text()
            assert (await patch(session, other, 6, 601))[0] == 200
    print(
        f"\nblackholed: not ready after {stale_after:.2f}s (stale_after {STALE}s, poll {POLL}s);"
        f" write refused ({code}) after {refused_after:.2f}s, the next one after {at_once:.3f}s"
    )
