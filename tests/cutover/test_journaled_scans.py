"""The journal view's look at open entries (``cutover/journaled.py``) on a queue's leftovers.

A verification's settling polls :meth:`JournalView.quiet` (up to 20 times a second, for up to
``drain_wait``) and a repair asks :meth:`JournalView.open_on` for every batch: each reads the
open entries of some records and of the dataset-wide writes (``*``: every create). Like the
replayer's wave before migration 0011, with no statistics the planner read them by bitmap
scans, which read every dead version the queue left in the open-entry index again on every
call (the dataset-wide token's: one for each create's intent and pending, since the last
VACUUM).
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from bascule.sealing import DATASET_WIDE, Namer, Sealer
from bascule.state.journal import Journal
from cutover.journaled import JournalView
from refapi.lab import migrate_state, write_config
from tests.scans import skipping

KEY = bytes(range(32))


async def test_the_views_open_entry_reads_skip_what_the_queue_left_behind(
    pg_url: str, tmp_path: Path
) -> None:
    await migrate_state(pg_url)
    config = write_config(
        tmp_path / "bascule.toml",
        source_url="http://127.0.0.1:1",
        target_url="http://127.0.0.1:2",
        postgres_url=pg_url,
        redis_url="redis://127.0.0.1:6379/0",
        redis_prefix="unused",
    )
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1)
    admin = await asyncpg.connect(pg_url)
    try:
        namer = Namer(KEY)
        view = JournalView(Journal(pool, Sealer(KEY), replica="t"), namer, config, "dcir")
        await admin.execute("ALTER TABLE bascule_journal SET (autovacuum_enabled = false)")
        insert = (
            "INSERT INTO bascule_journal (dataset, record, route, method, authority,"
            " stage_version, writer, writer_pid, writer_started, state, request)"
            " SELECT 'dcir', $3, '/v1/datasets/{dataset}/records', 'POST', 'source', 2, 'w', 0,"
            " now(), $1, convert_to(repeat('x', 600), 'UTF8') FROM generate_series(1, $2)"
        )
        # 10,000 creates (dataset-wide until answered), each through intent, pending, applied.
        await admin.execute(insert, "intent", 10_000, DATASET_WIDE)
        await admin.execute("UPDATE bascule_journal SET state = 'pending', decided_at = now()")
        await admin.execute("UPDATE bascule_journal SET state = 'applied', applied_at = now()")
        token = namer.record("dcir", "1")
        await admin.execute(insert, "pending", 1, token)  # the record being waited for

        async def look() -> None:
            busy = await view.open_on({token})
            assert busy.tokens == {token} and not busy.everything

        first, reads = await skipping(admin, pool, look)
        assert first > 1000  # the 20,000 dead versions of the creates
        # Once no snapshot can see them, an index scan has marked them and skips them; a
        # bitmap scan reads them all again on every call.
        assert reads[-1] < 100, (first, reads)
    finally:
        await admin.close()
        await pool.close()
