"""How many heap pages of the journal a reader reads: whether it skips the dead row versions
the queue leaves behind (an index scan marks them and skips them once no snapshot can see
them; a bitmap scan reads them all again on every call). Migration 0011."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg


async def _journal_pages(admin: asyncpg.Connection) -> int:
    await admin.execute("SELECT pg_stat_clear_snapshot()")
    pages: int = await admin.fetchval(
        "SELECT heap_blks_hit + coalesce(heap_blks_read, 0)"
        " FROM pg_statio_user_tables WHERE relname = 'bascule_journal'"
    )
    return pages


async def pages_read(
    admin: asyncpg.Connection, pool: asyncpg.Pool, call: Callable[[], Awaitable[object]], times: int
) -> int:
    """Heap pages of the journal read by ``times`` calls of ``call``, all on ``pool``'s one
    session (its statistics are flushed to be read on ``admin``'s)."""
    before = await _journal_pages(admin)
    for _ in range(times):
        await call()
    await pool.execute("SELECT pg_stat_force_next_flush()")
    await asyncio.sleep(0.2)  # flushed once its backend is idle
    return await _journal_pages(admin) - before


async def skipping(
    admin: asyncpg.Connection, pool: asyncpg.Pool, call: Callable[[], Awaitable[object]]
) -> tuple[int, list[int]]:
    """The pages one call reads first, then those five calls read, again until fewer than 100
    (20 tries, a quarter of a second apart): an entry is marked once no snapshot of its
    database could still see its row, and another test's session can hold that back a moment.
    A reader that skips dead versions ends under 100; a bitmap scan never does."""
    first = await pages_read(admin, pool, call, 1)
    reads = [await pages_read(admin, pool, call, 5)]
    while reads[-1] >= 100 and len(reads) < 20:
        await asyncio.sleep(0.25)
        reads.append(await pages_read(admin, pool, call, 5))
    return first, reads
