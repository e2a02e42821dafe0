"""Researchers writing through a test world's proxy while a data command runs."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from bascule.tasks import spawn
from refapi.lab import AUTH
from tests.world import World, researcher_write


@asynccontextmanager
async def writing(
    world: World, records: int, writers: int = 2, pause: float = 0.05
) -> AsyncIterator[list[int]]:
    """Researchers writing through the proxy until the block ends (PUTs, PATCHes, DELETEs on
    ids 1..``records``, and creates), each pausing ``pause`` between writes: a rate the replay
    keeps up with on the test machine (creates replay one at a time). Their statuses."""
    statuses: list[int] = []
    stop = asyncio.Event()

    async def writer(n: int) -> None:
        rng = random.Random(n)
        base = f"{world.proxy}/v1/datasets/dcir/records"
        async with aiohttp.ClientSession(headers=AUTH) as session:
            i = 0
            while not stop.is_set():
                async with researcher_write(session, base, rng, records, n, i) as resp:
                    await resp.read()
                    statuses.append(resp.status)
                i += 1
                await asyncio.sleep(pause)

    tasks = [spawn(writer(n), name=f"researcher-{n}") for n in range(writers)]
    try:
        yield statuses
    finally:
        stop.set()
        await asyncio.gather(*tasks)
