"""Backfill on real databases: refused outside dualwrite or with a replica behind; cancelled
halfway and resumed, what was written meanwhile settled. (Killed halfway while researchers
write through the proxy: tests/cutover/test_backfill_world.py.)"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import cutover.backfill
from bascule.config import Secrets
from bascule.stages import Stage
from cutover.backfill import BackfillOptions, backfill
from cutover.job import Silent, data_job
from tests.cutover import datajobs
from tests.cutover.datajobs import MakeDatabase, execute, report, run_cli, state
from tests.harness import fetch


async def test_a_backfill_is_refused_outside_dualwrite_and_while_a_replica_is_behind(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    source, target = await make_database("src"), await make_database("tgt")
    await datajobs.dcir(source, 1000)
    await datajobs.dcir(target, 0)
    await state(pg_url)
    path = tmp_path / "bascule.toml"
    datajobs.write_config(path, pg_url, (source, target))

    early = run_cli(path, "backfill", "dcir")
    assert early.returncode == 3 and "dualwrite only (the dataset is in source)" in early.stderr

    await execute(
        pg_url,
        "UPDATE bascule_stage SET stage = 'dualwrite', version = 2 WHERE dataset = 'dcir'",
        "INSERT INTO bascule_replica (name, versions, expires_at)"
        """ VALUES ('replica-behind', '{"dcir": 1}', now() + interval '1 hour')""",
    )
    behind = run_cli(path, "backfill", "dcir")
    assert behind.returncode == 3 and "replica-behind" in behind.stderr
    assert await fetch(pg_url, "SELECT * FROM bascule_backfill_run") == []
    assert (await fetch(target, "SELECT count(*) FROM dcir"))[0][0] == 0


async def test_a_cancelled_backfill_resumes_where_it_stopped(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    source, target = await make_database("src"), await make_database("tgt")
    await datajobs.dcir(source, 40_000)
    await datajobs.dcir(target, 0)
    # A row the proxy wrote already: the backfill must not overwrite it.
    await execute(target, datajobs.DCIR_ROWS, args=[20_000, 20_000])
    await execute(target, "UPDATE dcir SET amount = 99 WHERE id = 20000")
    await execute(source, "UPDATE dcir SET amount = 99 WHERE id = 20000")
    await state(pg_url, Stage.DUALWRITE)
    path = tmp_path / "bascule.toml"
    config = datajobs.write_config(path, pg_url, (source, target))
    secrets = Secrets.from_env(os.environ)

    class Stops(Silent):
        batches = 0

        def advance(self, task: str, rows: int, nbytes: int = 0) -> None:
            self.batches += 1
            if self.batches == 3:
                current = asyncio.current_task()
                assert current is not None
                current.cancel()

    async with data_job(
        config, secrets, "dcir", pg_url, actor="test", purpose="backfill", progress=Stops()
    ) as job:
        with pytest.raises(asyncio.CancelledError):
            await backfill(job, BackfillOptions(batch_rows=5000))
        this = asyncio.current_task()
        assert this is not None
        this.uncancel()  # the cancellation was this test's own, and it is over
    first = await fetch(pg_url, "SELECT status FROM bascule_backfill_run")
    assert [r["status"] for r in first] == ["interrupted"]
    assert (await fetch(target, "SELECT count(*) FROM dcir"))[0][0] == 15_001
    # What a copy racing the proxy leaves behind, as researchers' writes journaled since the
    # backfill began: record 3 deleted (its replay reached the target before the row did, and
    # the copy resurrected it), record 12000 updated (the copy wrote it over the replay).
    await execute(source, "DELETE FROM dcir WHERE id = 3")
    await datajobs.journaled(config, pg_url, 3, "DELETE")
    await execute(source, "UPDATE dcir SET amount = 12.34 WHERE id = 12000")
    await datajobs.journaled(config, pg_url, 12000, "PUT")

    resumed = run_cli(path, "backfill", "dcir", "--resume", "--batch-rows", "5000", "--json")
    assert resumed.returncode == 0, resumed.stderr
    answer = report(resumed)
    assert answer["status"] == "done" and answer["verification"]["status"] == "clean"
    # The batches already on the target, and the one holding the row written there before,
    # went through the staging table (that row kept); the rest straight in.
    batches = answer["tables"][0]["batches"]
    assert batches["staged"] >= 1 and batches["direct"] >= 3, batches
    settled = answer["settled"]
    assert (settled["written"], settled["deleted"], settled["upserted"]) == (2, 1, 1)
    assert (await fetch(target, "SELECT count(*) FROM dcir WHERE id = 3"))[0][0] == 0
    assert await datajobs.digest(source) == await datajobs.digest(target)


async def test_a_range_filled_by_a_replay_after_it_was_found_empty_goes_through_staging(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, target = await make_database("src"), await make_database("tgt")
    await datajobs.dcir(source, 10_000)
    await datajobs.dcir(target, 0)
    # Written through the proxy (both sides) just after the backfill found its range empty.
    await execute(target, datajobs.DCIR_ROWS, args=[5, 5])
    for db in (source, target):
        await execute(db, "UPDATE dcir SET amount = 55 WHERE id = 5")
    monkeypatch.setattr(cutover.backfill, "empty", lambda *args: True)
    await state(pg_url, Stage.DUALWRITE)
    config = datajobs.write_config(tmp_path / "bascule.toml", pg_url, (source, target))
    secrets = Secrets.from_env(os.environ)
    async with data_job(config, secrets, "dcir", pg_url, actor="test", purpose="backfill") as job:
        done = await backfill(job, BackfillOptions(batch_rows=4000))
    # The straight copy of the first range failed on record 5 and was undone; the range went
    # through the staging table instead, record 5 kept; the next ranges went straight in.
    assert done.tables[0].staged == 1 and done.tables[0].direct == 2
    assert done.tables[0].rows == 9_999
    assert done.verification is not None and done.verification.status == "clean"
