"""Edges of stored-data verification, repair and backfill (``bascule verify``, ``bascule
backfill``) found by a red team: special values that hash alike or apart, rows that move while
a sweep reads, keys named two ways, gaps and the gate around a run, incremental runs on a base
that cannot be trusted, one table configured as both sides, identity and generated columns,
journaled keys the table cannot hold, a refused command that must change nothing. Each test
failed before its fix (docs/decisions.md). Real Postgres; small tables seeded with
generate_series; no proxy world (the writes a proxy would make are made on both sides
directly, at the moment a test needs them)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

import cutover.checksum
from bascule.config import Config, Secrets, load_config
from bascule.errors import Refused
from bascule.sealing import Sealer
from bascule.stages import Side, Stage
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageStore
from cutover.backfill import BackfillOptions, backfill
from cutover.findings import Options, VerifyReport
from cutover.gate import Gate
from cutover.job import Progress, Silent, data_job
from cutover.verify import verify
from proxy.routing import Router
from tests.cutover import datajobs
from tests.cutover.datajobs import MakeDatabase, execute, state, table_world, token, walk_dataset
from tests.harness import fetch

# --- helpers -----------------------------------------------------------------------------


async def dcir_world(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str, rows: int, *stages: Stage
) -> tuple[Config, str, str]:
    """(config, source database, target database): dcir seeded alike with ``rows``."""
    source, target = await make_database("src"), await make_database("tgt")
    await datajobs.both(source, target, rows)
    await state(pg_url, *stages)
    config = datajobs.write_config(tmp_path / "bascule.toml", pg_url, (source, target))
    return config, source, target


async def verify_once(
    config: Config,
    pg_url: str,
    dataset: str = "dcir",
    options: Options | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    async with data_job(
        config,
        Secrets.from_env(os.environ),
        dataset,
        pg_url,
        actor="redteam",
        purpose="verify",
        progress=progress,
    ) as job:
        return await verify(job, options or Options())


def blocking(work: Callable[[], Awaitable[Any]]) -> None:
    """Run ``work`` to its end on an event loop of its own, in a thread, from synchronous code
    running inside a data job (a progress callback): the job cannot go on meanwhile."""
    failed: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(work())  # type: ignore[arg-type]
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=main)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


async def move(pg_url: str, *stages: Stage) -> None:
    """An SRE's moves of dcir (the store's own compare-and-set and gap bookkeeping)."""
    pool = await open_pool(pg_url, max_size=1)
    try:
        store = StageStore(pool)
        row = await store.get("dcir")
        for stage in stages:
            row = await store.change("dcir", row.version, stage, actor="sre", reason="redteam")
    finally:
        await pool.close()


def journal_applied(
    pg_url: str, dataset: str, key: str, method: str, entry_state: str = "applied"
) -> None:
    """A researcher's write of record ``key`` (as the route read it) in the journal as the
    proxy leaves it once replayed (applied now; or still ``pending`` its replay), its key
    sealed in its request; from synchronous code."""
    sealer = Sealer(Secrets.from_env(os.environ).require("journal_key"))
    request = {"method": method, "target": "/x", "key": key, "body": ""}
    sealed = sealer.seal(json.dumps(request).encode(), dataset=dataset, field="request")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO bascule_journal (dataset, record, route, method, authority,"
            " stage_version, writer, writer_pid, writer_started, state, request, status,"
            " decided_at, applied_at) VALUES (%s, %s, '/v1/datasets/{dataset}/records/{id}',"
            " %s, 'source', 2, 'proxy', 0, now(), %s, %s, 200, now(),"
            " CASE WHEN %s = 'applied' THEN now() END)",
            [dataset, token(key, dataset), method, entry_state, sealed, entry_state],
        )


async def gate_condition(pg_url: str, name: str) -> Any:
    pool = await open_pool(pg_url, max_size=1)
    try:
        row = await StageStore(pool).get("dcir")
        report = await Gate(pool).judge(row)
    finally:
        await pool.close()
    return next(c for c in report.conditions if c.name == name)


async def gap_since(pg_url: str, side: str = "target") -> Any:
    rows = await fetch(pg_url, f"SELECT gap_{side}_since FROM bascule_stage WHERE dataset='dcir'")
    return rows[0][0]


# --- 1. verification misses or invents differences ----------------------------------------


async def test_numeric_nan_and_infinities_that_differ_are_found(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """An unconstrained numeric column: NaN on one side, Infinity on the other (or Infinity
    against -Infinity) is a real difference: they render, compare and serve apart."""
    ddl = "CREATE TABLE cepidc (code bigint PRIMARY KEY, score numeric)"
    seed = "INSERT INTO cepidc SELECT g, g / 3.0 FROM generate_series(1, 1000) g"
    config, _, _ = await table_world(
        tmp_path,
        make_database,
        pg_url,
        [
            ddl,
            seed,
            "UPDATE cepidc SET score = 'NaN' WHERE code = 7",
            "UPDATE cepidc SET score = 'Infinity' WHERE code = 8",
            "ANALYZE cepidc",
        ],
        [
            ddl,
            seed,
            "UPDATE cepidc SET score = 'Infinity' WHERE code = 7",
            "UPDATE cepidc SET score = '-Infinity' WHERE code = 8",
            "ANALYZE cepidc",
        ],
        Stage.DUALWRITE,
    )
    found = await verify_once(config, pg_url, "cepidc")
    assert found.found["changed"] == {k: token(k, "cepidc") for k in ("7", "8")}, (
        f"status {found.status}: NaN vs Infinity and Infinity vs -Infinity were not seen"
    )


async def test_float_nans_that_render_alike_are_not_a_difference_repair_cannot_fix(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """A float NaN computed by the source (Infinity - Infinity: the sign bit set on x86) and the
    NaN a COPY or a replay wrote on the target render alike ('NaN') and are equal (=); hashed
    as bytes they differ, and a repair (COPY text: 'NaN') can never make them equal."""
    ddl = "CREATE TABLE cepidc (code bigint PRIMARY KEY, ratio float8)"
    seed = "INSERT INTO cepidc SELECT g, g / 7.0 FROM generate_series(1, 1000) g"
    config, source, target = await table_world(
        tmp_path,
        make_database,
        pg_url,
        [
            ddl,
            seed,
            "UPDATE cepidc SET ratio = 'Infinity'::float8 - 'Infinity'::float8 WHERE code = 7",
            "ANALYZE cepidc",
        ],
        [ddl, seed, "UPDATE cepidc SET ratio = 'NaN' WHERE code = 7", "ANALYZE cepidc"],
        Stage.DUALWRITE,
    )
    same = "SELECT ratio::text, ratio = 'NaN'::float8 FROM cepidc WHERE code = 7"
    assert [tuple(r) for r in await fetch(source, same)] == [("NaN", True)]
    assert [tuple(r) for r in await fetch(target, same)] == [("NaN", True)]

    found = await verify_once(config, pg_url, "cepidc")
    assert found.status == "clean", (
        f"a false difference: {found.found}; and --repair cannot remove it: "
        f"{(await verify_once(config, pg_url, 'cepidc', Options(repair=True, reason='x'))).repair}"
    )


async def test_a_divergent_row_moved_back_on_both_sides_during_the_scan_is_still_found(
    tmp_path: Path,
    make_database: MakeDatabase,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Record X differs (column ``a``) on the target. While the sweep reads, a researcher's
    PATCH of its column ``b`` goes through the proxy to both sides; on both, X's new version
    lands in a block already read (free space left by a vacuum), its old one is dead before
    its block is read. Neither side counts X, its chunk's figures agree: the run says clean
    (and would close the target's gap) while X still differs on ``a``."""
    monkeypatch.setattr(cutover.checksum, "BLOCKS_PER_SCAN", 1)
    ddl = (
        "CREATE TABLE cepidc (code bigint PRIMARY KEY, a int NOT NULL, b int NOT NULL,"
        " pad char(200) NOT NULL) WITH (fillfactor = 100, autovacuum_enabled = false)"
    )
    source, target = await make_database("src"), await make_database("tgt")
    # Rows per block, then only whole blocks: every block full, X the last row of the last.
    probe = "INSERT INTO cepidc SELECT g, g, g, 'x' FROM generate_series(1, 400) g"
    await execute(source, ddl, probe)
    per_block = (await fetch(source, "SELECT count(*) FROM cepidc WHERE ctid < '(1,0)'::tid"))[0][0]
    rows = 40 * per_block
    x = rows
    seed = (
        "INSERT INTO cepidc SELECT g, CASE WHEN g = {x} THEN {a} ELSE g END, g, 'x'"
        f" FROM generate_series(1, {rows}) g"
    )
    setup = [
        "DELETE FROM cepidc WHERE code IN (2, 3, 4)",  # room in block 0 only
        "VACUUM ANALYZE cepidc",
    ]
    await execute(source, "TRUNCATE cepidc", seed.format(x=x, a=x), *setup)
    await execute(target, ddl, seed.format(x=x, a=-1), *setup)
    await state(pg_url)
    await walk_dataset(pg_url, "cepidc", Stage.DUALWRITE)
    config = datajobs.write_config(tmp_path / "bascule.toml", pg_url, (source, target))

    names = {source.rsplit("/", 1)[1], target.rsplit("/", 1)[1]}

    class PatchDuringScan(Silent):
        """Once each side has read its first block range (and the sweep waits here), the
        researcher's PATCH of X lands on both sides, as the proxy and its replay write it."""

        patched = False

        def advance(self, task: str, rows: int, nbytes: int = 0) -> None:
            if self.patched or task not in ("source", "target"):
                return
            self.patched = True
            with psycopg.connect(source.rsplit("/", 1)[0] + "/postgres", autocommit=True) as c:
                for _ in range(400):  # both scans' sessions idle: each read its first range
                    busy = c.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = ANY(%s)"
                        " AND application_name = 'bascule verify' AND state <> 'idle'",
                        [list(names)],
                    ).fetchone()
                    if busy is not None and busy[0] == 0:
                        break
                    time.sleep(0.01)
            for db in (source, target):
                with psycopg.connect(db, autocommit=True) as c:
                    c.execute(f"UPDATE cepidc SET b = b + 1 WHERE code = {x}")
            journal_applied(pg_url, "cepidc", str(x), "PATCH")

    found = await verify_once(config, pg_url, "cepidc", progress=PatchDuringScan())
    # The scene happened as described: X's new version is in block 0 on both sides.
    for db in (source, target):
        where = await fetch(db, f"SELECT (ctid::text::point)[0]::int FROM cepidc WHERE code = {x}")
        assert where[0][0] == 0, "X did not move back: the test set-up did not happen"
    differs = await fetch(target, f"SELECT a FROM cepidc WHERE code = {x}")
    assert differs[0][0] == -1  # X still differs on the target
    assert found.found["changed"] == {str(x): token(x, "cepidc")}, (
        f"status {found.status}, gap {found.gap}: X differs and was not reported"
    )


async def test_a_uuid_record_named_in_capitals_is_one_record_to_proxy_and_verification(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """A researcher PUTs /records/F47AC10B-58CC-... (a valid uuid): the authority has the
    write, its replay to the target is pending. With ``key_format = "uuid"`` the proxy names
    the record by the key as Postgres renders it (lower case), as verification does: the write
    in flight is seen as such, not as a divergence. Routed as text, the two would name the
    record apart: verification refuses that configuration, naming the route and the fix."""
    u = "f47ac10b-58cc-4372-a567-0e02b2c3d479"
    ddl = "CREATE TABLE cepidc (code uuid PRIMARY KEY, score int)"
    seed = "INSERT INTO cepidc SELECT md5(g::text)::uuid, g FROM generate_series(1, 1000) g"
    source, target = await make_database("src"), await make_database("tgt")
    await execute(source, ddl, seed, f"INSERT INTO cepidc VALUES ('{u}', 2)", "ANALYZE cepidc")
    await execute(target, ddl, seed, f"INSERT INTO cepidc VALUES ('{u}', 1)", "ANALYZE cepidc")
    await state(pg_url)
    await walk_dataset(pg_url, "cepidc", Stage.DUALWRITE)

    as_text = datajobs.write_config(
        tmp_path / "text.toml", pg_url, (source, target), key_format="text"
    )
    with pytest.raises(Refused, match=r'key_format = .text.*set key_format = "uuid"'):
        await verify_once(as_text, pg_url, "cepidc")

    config = datajobs.write_config(
        tmp_path / "bascule.toml", pg_url, (source, target), key_format="uuid"
    )
    match = Router(config.routes, config.datasets).match(
        "PUT", f"/v1/datasets/cepidc/records/{u.upper()}"
    )
    assert match.key == u
    journal_applied(pg_url, "cepidc", match.key, "PUT", entry_state="pending")
    found = await verify_once(config, pg_url, "cepidc", Options(settle_for=1.0, drain_wait=0.5))
    assert found.found["changed"] == {}, f"a write in flight reported as a divergence: {found}"
    assert found.status == "failed" and found.unsettled == {u: token(u, "cepidc")}


# --- 2. gaps and the gate -----------------------------------------------------------------


async def test_a_gap_reopened_while_the_run_reads_is_not_closed_by_it(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """The target's gap is open (it always is until a first clean verification). While the
    run reads, an SRE rolls dcir back to source, a researcher's write reaches the source only,
    and dcir goes forward to dualwrite again: the target missed that write after its rows were
    read. The run is clean and closes the gap, and the gate trusts it."""
    config, source, target = await dcir_world(
        tmp_path, make_database, pg_url, 2000, Stage.DUALWRITE
    )
    assert await gap_since(pg_url) is not None

    class RollbackMeanwhile(Silent):
        done_sides = 0

        def done(self, task: str) -> None:
            if task not in ("source", "target"):
                return
            self.done_sides += 1
            if self.done_sides == 2:  # both sides read: the rows of record 5 included

                async def meanwhile() -> None:
                    await move(pg_url, Stage.SOURCE)
                    await execute(source, "UPDATE dcir SET amount = 12.34 WHERE id = 5")
                    await move(pg_url, Stage.DUALWRITE)

                blocking(meanwhile)

    found = await verify_once(config, pg_url, progress=RollbackMeanwhile())
    assert (await fetch(source, "SELECT amount FROM dcir WHERE id = 5"))[0][0] != (
        await fetch(target, "SELECT amount FROM dcir WHERE id = 5")
    )[0][0]
    assert found.status == "clean"
    verified = await gate_condition(pg_url, "verified")
    assert await gap_since(pg_url) is not None, (
        f"the gap was closed ({found.gap}) though the target missed a write made after the "
        f"run read its rows; the gate's 'verified' then says {verified.ok}: {verified.detail}"
    )


async def test_the_gate_does_not_trust_a_verification_made_while_the_target_was_not_written(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """The target was loaded offline and verified clean while dcir was still in `source`
    (allowed: the run is recorded clean, it just cannot close the gap). Researchers keep
    writing to the source only; then dualwrite, the SRE closes the gap on their word citing
    that run (docs/operations.md), shadow. The gate must not count the older run: writes made
    after it never reached the target ("a gap closed on an SRE's word does not satisfy it")."""
    config, source, _ = await dcir_world(tmp_path, make_database, pg_url, 2000)
    offline = await verify_once(config, pg_url)
    assert offline.status == "clean" and offline.gap["closed"] is False
    await execute(source, "UPDATE dcir SET amount = 12.34 WHERE id = 5")  # source only
    await move(pg_url, Stage.DUALWRITE)
    pool = await open_pool(pg_url, max_size=1)
    try:
        await StageStore(pool).close_gap(
            "dcir", Side.TARGET, actor="sre", reason=f"verify run {offline.run} clean"
        )
    finally:
        await pool.close()
    await move(pg_url, Stage.SHADOW)
    verified = await gate_condition(pg_url, "verified")
    assert not verified.ok, (
        f"the gate trusts run {offline.run}, made in `source` before writes the target never "
        f"got: {verified.detail}"
    )


async def test_an_incremental_run_after_a_sweep_made_in_source_sees_source_only_writes(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """A clean full sweep made while dcir was in `source`; a write then reaches the source
    only (not journaled: `source` writes one side); dcir moves to dualwrite. An incremental
    run must refuse (it cannot know those writes) or find the record: it says clean."""
    config, source, _ = await dcir_world(tmp_path, make_database, pg_url, 2000)
    assert (await verify_once(config, pg_url)).status == "clean"
    await execute(source, "UPDATE dcir SET amount = 12.34 WHERE id = 5")
    await move(pg_url, Stage.DUALWRITE)
    try:
        found = await verify_once(config, pg_url, options=Options(mode="incremental"))
    except Refused:
        return
    assert found.found["changed"] == {"5": token(5)}, (
        f"incremental run {found.run}: {found.status}, record 5 differs and was not checked"
    )


async def test_the_gate_does_not_pass_on_a_clean_run_older_than_a_divergent_one(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """A clean full run, then a full run that finds record 5 changed on the target (behind
    bascule's back). The newest verification says the sides differ; the gate still says
    'verified' on the older clean run and would let dcir move to live."""
    config, _, target = await dcir_world(tmp_path, make_database, pg_url, 2000, Stage.DUALWRITE)
    assert (await verify_once(config, pg_url)).status == "clean"
    await execute(target, "UPDATE dcir SET amount = 0 WHERE id = 5")
    divergent = await verify_once(config, pg_url)
    assert divergent.found["changed"] == {"5": token(5)}
    await move(pg_url, Stage.SHADOW)
    verified = await gate_condition(pg_url, "verified")
    assert not verified.ok, f"run {divergent.run} is divergent, yet: {verified.detail}"


async def test_an_incremental_run_after_a_divergent_sweep_still_reports_what_it_found(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """A clean full sweep, then one that finds record 11 changed (not through bascule). An
    incremental run bases itself on the older clean sweep, checks only journaled keys, and
    says clean: the gate then takes it as the newest clean verification."""
    config, _, target = await dcir_world(tmp_path, make_database, pg_url, 2000, Stage.DUALWRITE)
    assert (await verify_once(config, pg_url)).status == "clean"
    await execute(target, "UPDATE dcir SET amount = 0 WHERE id = 11")
    assert (await verify_once(config, pg_url)).found["changed"] == {"11": token(11)}
    try:
        found = await verify_once(config, pg_url, options=Options(mode="incremental"))
    except Refused:
        return
    assert found.status != "clean", (
        f"incremental run {found.run} is clean; record 11 still differs on the target"
    )


async def test_both_sides_configured_on_one_database_is_refused_not_verified_clean(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """A copy-paste slip: the target backend's `database` is the source's DSN. Verification
    compares the source's table with itself, says clean and closes the target's gap (the
    gate then trusts it); a backfill would copy the table onto itself and do the same. The
    two sides being one table should be refused as bad configuration, changing nothing."""
    source, target = await make_database("src"), await make_database("tgt")
    await datajobs.dcir(source, 2000)
    await datajobs.dcir(target, 0)  # the real target: empty
    await state(pg_url, Stage.DUALWRITE)
    path = tmp_path / "bascule.toml"
    datajobs.write_config(path, pg_url, (source, source))
    found = datajobs.run_cli(path, "verify", "dcir", "--json")
    assert found.returncode == 3, f"exit {found.returncode}: {found.stdout[:300]}"
    assert await gap_since(pg_url) is not None


# --- 3. repair and backfill --------------------------------------------------------------


async def test_repair_writes_onto_a_table_whose_key_is_an_identity_generated_always(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """The target's key is `GENERATED ALWAYS AS IDENTITY` (its type is bigint on both sides,
    so the tables compare): a record missing there cannot be repaired (the staged INSERT
    lacks OVERRIDING SYSTEM VALUE); a COPY straight in would have worked."""
    rows = "INSERT INTO cepidc (code, score) SELECT g, g FROM generate_series(1, 1000) g"
    config, _, target = await table_world(
        tmp_path,
        make_database,
        pg_url,
        ["CREATE TABLE cepidc (code bigint PRIMARY KEY, score int)", rows, "ANALYZE cepidc"],
        [
            "CREATE TABLE cepidc (code bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, score int)",
            "INSERT INTO cepidc (code, score) OVERRIDING SYSTEM VALUE"
            " SELECT g, g FROM generate_series(1, 1000) g",
            "DELETE FROM cepidc WHERE code = 5",
            "ANALYZE cepidc",
        ],
        Stage.DUALWRITE,
    )
    repaired = await verify_once(config, pg_url, "cepidc", Options(repair=True, reason="redteam"))
    assert repaired.repaired_all and repaired.repair and repaired.repair["upserted"] == 1
    assert (await fetch(target, "SELECT count(*) FROM cepidc WHERE code = 5"))[0][0] == 1


async def test_a_backfill_copies_a_table_with_a_generated_column(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """Both sides compute `total` (GENERATED ALWAYS AS ... STORED): the backfill lists it in
    its COPY into the target, which Postgres refuses; nothing can be copied."""
    ddl = (
        "CREATE TABLE cepidc (code bigint PRIMARY KEY, score int,"
        " total int GENERATED ALWAYS AS (score * 2) STORED)"
    )
    config, _, target = await table_world(
        tmp_path,
        make_database,
        pg_url,
        [
            ddl,
            "INSERT INTO cepidc (code, score) SELECT g, g FROM generate_series(1, 1000) g",
            "ANALYZE cepidc",
        ],
        [ddl, "ANALYZE cepidc"],
        Stage.DUALWRITE,
    )
    async with data_job(
        config,
        Secrets.from_env(os.environ),
        "cepidc",
        pg_url,
        actor="redteam",
        purpose="backfill",
    ) as job:
        done = await backfill(job, BackfillOptions())
    assert done.status == "done"
    assert (await fetch(target, "SELECT count(*) FROM cepidc"))[0][0] == 1000


async def test_a_journaled_key_the_table_cannot_hold_does_not_wedge_backfill_settling(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """During the backfill a researcher's DELETE of record 99999999999999999999 (the proxy
    takes any digits for an integer key; the authority timed out, the resolver settled it:
    applied) is in the journal. Settling casts every journaled key to bigint: the backfill
    fails at its end, and every resume fails the same way until the entry is purged."""
    source, target = await make_database("src"), await make_database("tgt")
    await datajobs.dcir(source, 2000)
    await datajobs.dcir(target, 0)
    await state(pg_url, Stage.DUALWRITE)
    config = datajobs.write_config(tmp_path / "bascule.toml", pg_url, (source, target))

    huge = "99999999999999999999"

    class DeleteDuringCopy(Silent):
        """Once the copy is done, the researcher's DELETE is in the journal, settled."""

        def done(self, task: str) -> None:
            if task != "copy":
                return
            journal_applied(pg_url, "dcir", huge, "DELETE")

    async with data_job(
        config,
        Secrets.from_env(os.environ),
        "dcir",
        pg_url,
        actor="redteam",
        purpose="backfill",
        progress=DeleteDuringCopy(),
    ) as job:
        done = await backfill(job, BackfillOptions())
    assert done.status == "done", done.as_json()
    assert await datajobs.digest(source) == await datajobs.digest(target)


# --- 6. bad input changes nothing ----------------------------------------------------------


async def test_a_refused_verification_changes_nothing(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """`bascule verify dcir --resume` with nothing to resume is refused (exit 3). Before
    refusing, the job has already skipped a repair entry a dead job left, opened the target's
    gap (blocking every move that exposes the target) and written audit rows."""
    config, _, _ = await dcir_world(tmp_path, make_database, pg_url, 1000, Stage.DUALWRITE)
    assert (await verify_once(config, pg_url)).gap["closed"] is True
    await execute(
        pg_url,
        "INSERT INTO bascule_journal (dataset, record, route, method, authority,"
        " stage_version, writer, writer_pid, writer_started, state, request)"
        " VALUES ('dcir', $1, 'bascule:repair', 'PUT', 'source', 2, 'bascule verify x:1',"
        " 0, now(), 'intent', '\\x00')",
        args=[token(7)],
    )
    audits = (await fetch(pg_url, "SELECT count(*) FROM bascule_audit"))[0][0]
    refused = datajobs.run_cli(tmp_path / "bascule.toml", "verify", "dcir", "--resume")
    assert refused.returncode == 3 and "no interrupted verification" in refused.stderr
    left = await fetch(pg_url, "SELECT state FROM bascule_journal")
    assert [r["state"] for r in left] == ["intent"], "the refused command settled an entry"
    assert (await fetch(pg_url, "SELECT count(*) FROM bascule_audit"))[0][0] == audits
    assert await gap_since(pg_url) is None, "the refused command opened the target's gap"


async def test_a_datasets_own_route_before_the_shared_one_names_its_records(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """cepidc is keyed by text while the shared record route reads integers: a route of
    cepidc's own, declared before it, takes its requests (first match wins), so verification
    accepts it; the shared route alone is refused."""
    ddl = "CREATE TABLE cepidc (code text PRIMARY KEY, score int)"
    seed = "INSERT INTO cepidc SELECT 'c' || g, g FROM generate_series(1, 100) g"
    source, target = await make_database("src"), await make_database("tgt")
    await execute(source, ddl, seed)
    await execute(target, ddl, seed)
    await state(pg_url)
    await walk_dataset(pg_url, "cepidc", Stage.DUALWRITE)
    shared = datajobs.write_config(tmp_path / "shared.toml", pg_url, (source, target))
    with pytest.raises(Refused, match=r"set key_format = .text."):
        await verify_once(shared, pg_url, "cepidc")
    text = (tmp_path / "shared.toml").read_text()
    own = (
        '[[routes]]\npath = "/v1/datasets/cepidc/records/{id}"\ndataset = "cepidc"\n'
        'methods = ["PUT", "PATCH", "DELETE"]\nkind = "write"\nkey = "id"\n'
    )
    first = text.index("[[routes]]")
    (tmp_path / "own.toml").write_text(text[:first] + own + text[first:])
    found = await verify_once(load_config(tmp_path / "own.toml"), pg_url, "cepidc")
    assert found.status == "clean"
