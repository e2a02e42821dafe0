"""A backfill killed halfway and resumed while researchers write through the proxy: every
update, create and delete they made is on both sides with the authority's values."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import pytest

from bascule.stages import Stage
from tests.conftest import Ground
from tests.cutover import datajobs
from tests.cutover.flowing import writing
from tests.harness import fetch
from tests.world import build_world, table_digest

ROWS = 150_000


@pytest.mark.timeout(300)
async def test_a_backfill_killed_halfway_and_resumed_keeps_every_write_made_through_the_proxy(
    ground: Ground,
) -> None:
    started = time.monotonic()
    async with build_world(ground, rows=0, stages=(Stage.DUALWRITE,), ids=True) as world:
        await datajobs.dcir(world.source_db, ROWS)
        await datajobs.dcir(world.target_db, 0)
        config = world.config_path
        env = {**os.environ, "BASCULE_CONFIG": str(config)}
        async with writing(world, ROWS) as statuses:
            # Updates, creates and deletes across the whole table: on rows copied already,
            # and on rows not copied yet (a delete there reaches the target before the row).
            await asyncio.sleep(0.5)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                datajobs.MAIN,
                "backfill",
                "dcir",
                "--batch-rows",
                "5000",
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            copied = 0
            async with asyncio.timeout(100):
                while copied < ROWS // 3:
                    found = await fetch(
                        world.state_db,
                        "SELECT coalesce(sum(rows), 0) FROM bascule_backfill_checkpoint",
                    )
                    copied = found[0][0]
                    await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            killed = await fetch(world.state_db, "SELECT status FROM bascule_backfill_run")
            assert [r["status"] for r in killed] == ["running"]  # its process died mid-way
            halfway = time.monotonic()

            code, out, err = await datajobs.run_cli_async(
                config, "backfill", "dcir", "--resume", "--batch-rows", "5000", "--json"
            )
            assert code == 0, err
            done = datajobs.report_text(out, err)
            resumed = time.monotonic()
        assert done["status"] == "done"
        table = done["tables"][0]
        assert 0 < table["rows"] and table["batches"]["staged"] + table["batches"]["direct"] > 0
        verification = done["verification"]
        assert verification["status"] == "clean", verification
        assert verification["gap"]["closed"] is True
        runs = await fetch(
            world.state_db, "SELECT id, status, resumed_from FROM bascule_backfill_run ORDER BY id"
        )
        assert [(r["status"], r["resumed_from"]) for r in runs] == [
            ("interrupted", None),
            ("done", runs[0]["id"]),
        ]
        assert len(statuses) > 50 and all(s < 500 for s in statuses)
        deleted = sum(1 for s in statuses if s == 204)
        counts = await world.drained()
        assert not counts.get("dead") and not counts.get("in_doubt")
        # Both sides hold the same rows: every create, update and delete made through the
        # proxy during the copy is there with the authority's values, nothing resurrected.
        assert await table_digest(world.source_db) == await table_digest(world.target_db)
    print(
        f"backfill killed after {halfway - started:.1f} s, resumed and verified in "
        f"{resumed - halfway:.1f} s; {len(statuses)} researcher writes ({deleted} deletes); "
        f"settled: {json.dumps(done['settled'])}"
    )
