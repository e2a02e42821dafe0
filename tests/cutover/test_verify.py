"""Stored-data verification on real databases: differences found as tokens, servers configured
differently, schema differences, bad input, gaps, checkpoints and resume, incremental runs.
(Writes flowing through a proxy meanwhile: tests/cutover/test_verify_world.py.)"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import psycopg
import pytest

import cutover.checksum
from bascule.config import Config, Secrets, load_config
from bascule.stages import Stage
from bascule.tasks import spawn
from cutover.findings import Options, VerifyReport
from cutover.job import Silent, data_job
from cutover.verify import verify
from tests.cutover import datajobs
from tests.cutover.datajobs import (
    MakeDatabase,
    both,
    execute,
    report,
    run_cli,
    state,
    token,
)
from tests.harness import fetch


async def world(
    tmp_path: Path,
    make_database: MakeDatabase,
    pg_url: str,
    rows: int,
    *stages: Stage,
) -> tuple[Path, str, str]:
    """(config path, source database, target database): dcir seeded alike with ``rows``."""
    source, target = await make_database("src"), await make_database("tgt")
    await both(source, target, rows)
    await state(pg_url, *stages)
    path = tmp_path / "bascule.toml"
    datajobs.write_config(path, pg_url, (source, target))
    return path, source, target


async def run(
    config: Config, pg_url: str, options: Options | None = None, **kw: Any
) -> VerifyReport:
    secrets = Secrets.from_env(os.environ)
    async with data_job(
        config, secrets, "dcir", pg_url, actor="test", purpose="verify", **kw
    ) as job:
        return await verify(job, options or Options())


async def runs(pg_url: str) -> list[dict[str, Any]]:
    rows = await fetch(pg_url, "SELECT * FROM bascule_verify_run ORDER BY id")
    return [{**dict(r), "figures": json.loads(r["figures"])} for r in rows]


async def inject(target: str, missing: list[int], extra: list[int], changed: list[int]) -> None:
    """Differences behind bascule's back, on the target."""
    await execute(
        target,
        "DELETE FROM dcir WHERE id = ANY($1::bigint[])",
        args=[missing],
    )
    await execute(
        target,
        "INSERT INTO dcir (id, patient_id, act_code, act_date, amount, department)"
        " SELECT g, 'Pffffffffffffffff', 'G', date '2024-01-01', 1.00, '75'"
        " FROM unnest($1::bigint[]) g",
        args=[extra],
    )
    await execute(
        target,
        "UPDATE dcir SET amount = amount + 0.01 WHERE id = ANY($1::bigint[])",
        args=[changed],
    )


async def test_differences_are_reported_as_tokens_shown_when_asked_and_repaired(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    path, source, target = await world(tmp_path, make_database, pg_url, 60_000, Stage.DUALWRITE)
    missing, extra, changed = [5, 30_001, 59_999], [60_005, 70_000, 1_000_000], [1, 16_385, 40_000]
    await inject(target, missing, extra, changed)
    patient = (await fetch(source, "SELECT patient_id FROM dcir WHERE id = 16385"))[0][0]

    found = run_cli(path, "verify", "dcir", "--json")
    assert found.returncode == 4, found.stderr
    answer = report(found)
    assert answer["status"] == "divergent"
    assert answer["authority"] == "source" and answer["verified"] == "target"
    for kind, keys in (("missing", missing), ("extra", extra), ("changed", changed)):
        assert answer[kind] == {"count": 3, "tokens": sorted(token(k) for k in keys)}, kind
    assert answer["tables"][0]["rows"] == {"source": 60_000, "target": 60_000}
    assert "keys" not in answer
    # No value, no key in the answer or in what the run recorded.
    recorded = json.dumps((await runs(pg_url))[-1]["figures"])
    for text in (found.stdout, recorded):
        assert patient not in text and '"16385"' not in text and "30001" not in text
    assert (await runs(pg_url))[-1]["status"] == "divergent"
    gap = await fetch(pg_url, "SELECT gap_target_since FROM bascule_stage WHERE dataset='dcir'")
    assert gap[0][0] is not None  # a divergent run closes nothing

    refused = run_cli(path, "verify", "dcir", "--show-keys")
    assert refused.returncode == 2 and "--reason" in refused.stderr
    shown = run_cli(path, "verify", "dcir", "--show-keys", "--reason", "ticket 42", "--json")
    assert shown.returncode == 4
    keys = report(shown)["keys"]
    assert keys["missing"] == sorted(str(k) for k in missing)
    assert keys["changed"] == sorted(str(k) for k in changed)
    audited = await datajobs.audit_rows(pg_url, "verify-show-keys")
    assert [(a["reason"], a["details"]["changed"]) for a in audited] == [("ticket 42", 3)]

    repaired = run_cli(path, "verify", "dcir", "--repair", "--reason", "ticket 43", "--json")
    assert repaired.returncode == 0, repaired.stderr
    result = report(repaired)["repair"]
    assert (result["upserted"], result["deleted"], result["still_differing"]) == (6, 3, 0)
    entries = await fetch(
        pg_url,
        "SELECT record, method, state FROM bascule_journal WHERE route = 'bascule:repair'",
    )
    assert sorted((r["record"], r["method"], r["state"]) for r in entries) == sorted(
        [(token(k), "PUT", "applied") for k in missing + changed]
        + [(token(k), "DELETE", "applied") for k in extra]
    )
    audited = await datajobs.audit_rows(pg_url, "verify-repair")
    assert audited[0]["details"]["upserted"] == 6 and audited[0]["reason"] == "ticket 43"

    clean = run_cli(path, "verify", "dcir")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "dcir: clean" in clean.stdout and "is closed (audited)" in clean.stdout
    closes = await datajobs.audit_rows(pg_url, "gap-close")
    assert closes[-1]["details"]["side"] == "target"
    assert closes[-1]["details"]["run"] == (await runs(pg_url))[-1]["id"]


async def test_servers_configured_differently_agree_on_equal_rows_and_see_a_real_difference(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """The target's database renders times in Paris, dates the SQL way, floats with fewer
    digits, bytea escaped; its text key sorts under a French ICU collation."""
    source, target = await make_database("src"), await make_database("tgt")
    name = target.rsplit("/", 1)[1]
    await execute(
        target,
        f"ALTER DATABASE {name} SET timezone = 'Europe/Paris'",
        f"ALTER DATABASE {name} SET datestyle = 'SQL, DMY'",
        f"ALTER DATABASE {name} SET extra_float_digits = 0",
        f"ALTER DATABASE {name} SET intervalstyle = 'sql_standard'",
        f"ALTER DATABASE {name} SET bytea_output = 'escape'",
    )
    for db, collation in ((source, '"C"'), (target, '"fr-x-icu"')):
        await execute(
            db,
            f"CREATE TABLE cepidc (code text COLLATE {collation} PRIMARY KEY, ratio float8,"
            " score numeric, amount numeric(10,2), seen_at timestamptz, born date,"
            ' lasted interval, raw bytea, doc jsonb, label text COLLATE "fr-x-icu")',
            # Keys of both cases, accents and digits: the two collations order them apart.
            "INSERT INTO cepidc SELECT"
            " (ARRAY['a', 'B', 'é', 'E', 'z', 'Z', '1', 'ß'])[1 + g % 8] || g::text,"
            " g / 7.0::float8, g / 3.0, (g % 1000) / 100.0,"
            " timestamptz '2024-03-30 23:30:00+00' + g * interval '17 min',"
            " date '2024-01-01' + g % 400, g * interval '1.5 second',"
            " decode(md5(g::text), 'hex'), jsonb_build_object('n', g, 'x', g / 4.0),"
            " 'Élodie ' || g FROM generate_series(1, 40000) g",
        )
    path = tmp_path / "bascule.toml"
    config = datajobs.write_config(path, pg_url, (source, target), key_format="text")
    await state(pg_url, Stage.DUALWRITE)

    async def cepidc() -> VerifyReport:
        secrets = Secrets.from_env(os.environ)
        async with data_job(
            config, secrets, "cepidc", pg_url, actor="test", purpose="verify"
        ) as job:
            return await verify(job, Options())

    equal = await cepidc()
    assert equal.status == "clean", equal.as_json()
    assert equal.tables[0].rows == {s: 40_000 for s in equal.tables[0].rows}
    assert equal.tables[0].chunks == 3

    # One float a unit in the last place away, one numeric scale, one instant a microsecond.
    await execute(
        target,
        "UPDATE cepidc SET ratio = ratio + ratio * 4e-16 WHERE code = 'B1'",
        "UPDATE cepidc SET score = 1.50 WHERE code = 'é2'",
        "UPDATE cepidc SET score = 1.5 WHERE code = 'é2'",
        "UPDATE cepidc SET seen_at = seen_at + interval '1 microsecond' WHERE code = 'z20004'",
    )
    await execute(source, "UPDATE cepidc SET score = 1.50 WHERE code = 'é2'")
    differ = await cepidc()
    assert differ.status == "divergent"
    assert differ.found["changed"] == {k: token(k, "cepidc") for k in ("B1", "é2", "z20004")}, (
        differ.as_json()
    )


async def test_schema_differences_are_reported_as_such_and_rows_compared_on_shared_columns(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    path, _, target = await world(tmp_path, make_database, pg_url, 30_000, Stage.DUALWRITE)
    await execute(
        target,
        "ALTER TABLE dcir ADD COLUMN comment text",
        "ALTER TABLE dcir DROP COLUMN prescriber_speciality",
        "ALTER TABLE dcir ALTER COLUMN amount TYPE numeric(12,2)",
        "UPDATE dcir SET department = '2A' WHERE id = 777",
    )
    found = run_cli(path, "verify", "dcir", "--json")
    assert found.returncode == 4
    answer = report(found)
    assert answer["tables"][0]["schema"] == {
        "only_source": ["prescriber_speciality"],
        "only_target": ["comment"],
        "type_changed": [
            {"column": "amount", "source": "numeric(10,2)", "target": "numeric(12,2)"}
        ],
    }
    # Not 30,000 changed rows: the one that differs on the columns both sides share.
    assert answer["changed"]["tokens"] == [token(777)]
    assert answer["missing"]["count"] == answer["extra"]["count"] == 0
    human = run_cli(path, "verify", "dcir")
    assert "schema: column amount is numeric(10,2) on the source, numeric(12,2) on the target" in (
        human.stdout
    )


async def test_bad_input_is_refused_clearly_and_changes_nothing(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    path, source, target = await world(tmp_path, make_database, pg_url, 1000, Stage.DUALWRITE)
    before = await fetch(pg_url, "SELECT count(*) FROM bascule_audit")

    unknown = run_cli(path, "verify", "nosuch")
    assert unknown.returncode == 3 and "unknown dataset 'nosuch'" in unknown.stderr

    await execute(source, "CREATE TABLE pmsi (id bigint, note text)")
    await execute(target, "CREATE TABLE pmsi (id bigint, note text)")
    keyless = run_cli(path, "verify", "pmsi")
    assert keyless.returncode == 3
    assert "public.pmsi" in keyless.stderr and "has no primary key" in keyless.stderr

    missing_table = run_cli(path, "verify", "cepidc")
    assert missing_table.returncode == 3 and "no table 'cepidc'" in missing_table.stderr

    no_dsn = tmp_path / "no-dsn.toml"
    datajobs.write_config(no_dsn, pg_url, (source, None))
    unset = run_cli(no_dsn, "verify", "dcir")
    assert unset.returncode == 1 and "backends.scaleway.database" in unset.stderr

    assert run_cli(path, "verify", "dcir", "--repair").returncode == 2
    nothing = run_cli(path, "verify", "dcir", "--resume")
    assert nothing.returncode == 3 and "no interrupted verification" in nothing.stderr

    # A backfill that runs (held on the target's table lock) refuses verification.
    blocker = await psycopg.AsyncConnection.connect(target)
    await execute(target, "TRUNCATE dcir")
    async with blocker.transaction():
        await blocker.execute("LOCK TABLE dcir IN EXCLUSIVE MODE")
        filling = spawn(datajobs.run_cli_async(path, "backfill", "dcir"), name="backfill")
        for _ in range(200):
            rows = await fetch(pg_url, "SELECT status FROM bascule_backfill_run")
            if rows:
                break
            await asyncio.sleep(0.05)
        assert [r["status"] for r in rows] == ["running"]
        busy = await asyncio.to_thread(run_cli, path, "verify", "dcir")
        assert busy.returncode == 3
        assert "a backfill of dcir is running (run 1" in busy.stderr
        # Nothing recorded by any refusal: no run, no audit.
        assert await runs(pg_url) == []
        assert await fetch(pg_url, "SELECT count(*) FROM bascule_audit") == before
    await blocker.close()
    code, _, err = await filling
    assert code == 0, err
    assert [r["status"] for r in await runs(pg_url)] == ["clean"]  # the backfill's own

    # Two verifications at once: the second is refused while the first holds the dataset.
    blocker = await psycopg.AsyncConnection.connect(source)
    async with blocker.transaction():
        await blocker.execute("LOCK TABLE dcir IN ACCESS EXCLUSIVE MODE")  # holds the first
        first = spawn(datajobs.run_cli_async(path, "verify", "dcir"), name="verify")
        for _ in range(200):
            waiting = await fetch(
                source,
                "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'bascule verify%'"
                " AND wait_event_type = 'Lock'",
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        second = await asyncio.to_thread(run_cli, path, "verify", "dcir")
        assert second.returncode == 3
        assert "verification or backfill of dcir is starting" in second.stderr
    await blocker.close()
    code, _, err = await first
    assert code == 0, err


async def test_a_clean_run_closes_a_gap_open_before_it_and_only_that(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    path, _, target = await world(tmp_path, make_database, pg_url, 2000, Stage.DUALWRITE)
    config = load_config(path)
    await execute(target, "UPDATE dcir SET amount = 0 WHERE id = 3")
    divergent = await run(config, pg_url)
    assert divergent.status == "divergent" and not divergent.gap
    await execute(target, "UPDATE dcir SET amount = (SELECT 3 % 10000 / 100.0) WHERE id = 3")

    class Reopens(Silent):
        """Opens the target's gap again while the run reads (as a move to source and back
        would), with a blocking session: the run cannot finish before it is done."""

        def done(self, task: str) -> None:
            if task == "target":
                with psycopg.connect(pg_url, autocommit=True) as conn:
                    conn.execute(
                        "UPDATE bascule_stage SET gap_target_since = now(),"
                        " gap_target_opened = now() WHERE dataset = 'dcir'"
                    )

    late = await run(config, pg_url, progress=Reopens())
    assert late.status == "clean"
    assert late.gap["closed"] is False and "after this run began reading" in late.gap["detail"]

    clean = await run(config, pg_url)
    assert clean.status == "clean" and clean.gap["closed"] is True
    audited = await datajobs.audit_rows(pg_url, "gap-close")
    assert [a["details"]["run"] for a in audited] == [clean.run]
    again = await run(config, pg_url)
    assert again.gap == {"side": "target", "closed": False, "detail": "the target has no open gap"}


async def test_an_interrupted_run_resumes_from_its_checkpoint(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cutover.checksum, "BLOCKS_PER_SCAN", 512)  # a few ranges per side
    path, _, target = await world(tmp_path, make_database, pg_url, 120_000, Stage.DUALWRITE)
    config = load_config(path)
    await execute(target, "UPDATE dcir SET act_code = 'CS' WHERE id = 119000")

    current = asyncio.current_task()
    assert current is not None
    this = current

    class Stops(Silent):
        """Stops the run (as Ctrl-C would) once the target's scan has read two block ranges."""

        seen = 0

        def advance(self, task: str, rows: int, nbytes: int = 0) -> None:
            if task == "target":
                self.seen += 1
                if self.seen == 2:
                    this.cancel()

    with pytest.raises(asyncio.CancelledError):
        await run(config, pg_url, progress=Stops())
    this.uncancel()  # the cancellation was this test's own, and it is over
    first = (await runs(pg_url))[-1]
    assert first["status"] == "interrupted"
    sealed = await fetch(pg_url, "SELECT position FROM bascule_verify_checkpoint")
    assert b"bounds" not in sealed[0]["position"]  # keys and sums are sealed

    resumed = await run(config, pg_url, Options(resume=True))
    assert resumed.status == "divergent"
    assert resumed.found["changed"] == {"119000": token(119000)}
    table = resumed.tables[0]
    assert table.rows == {s: 120_000 for s in table.rows}
    assert sum(table.scanned.values()) < 2 * 120_000  # only what was left
    second = (await runs(pg_url))[-1]
    assert second["resumed_from"] == first["id"]
    assert second["swept_since"] == first["swept_since"]


async def test_incremental_checks_what_the_journal_shows_written(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    path, _, target = await world(tmp_path, make_database, pg_url, 5000, Stage.DUALWRITE)
    config = load_config(path)
    nothing_yet = run_cli(path, "verify", "dcir", "--incremental")
    assert nothing_yet.returncode == 3 and "no full verification yet" in nothing_yet.stderr
    assert (await run(config, pg_url)).status == "clean"

    secrets = Secrets.from_env(os.environ)
    async with data_job(config, secrets, "dcir", pg_url, actor="t", purpose="test") as job:
        for key in ("7", "9"):
            async with job.journal.locked("dcir", [token(key)]) as held:
                seq = await held.intent(
                    record=token(key),
                    route="/v1/datasets/{dataset}/records/{id}",
                    method="PUT",
                    authority="source",
                    stage_version=job.stage.version,
                    request={"method": "PUT", "target": "/x", "key": key, "body": ""},
                )
                await held.decide(seq, "pending", status=200, answer=b"{}")
            await job.journal.applied(seq)
    # Behind bascule's back: 9 (journaled) and 11 (not) changed on the target.
    await execute(target, "UPDATE dcir SET amount = 0 WHERE id IN (9, 11)")
    found = await run(config, pg_url, Options(mode="incremental"))
    assert found.status == "divergent"
    assert found.found["changed"] == {"9": token(9)}  # 11 was not written through bascule
    assert found.tables[0].scanned == {s: 2 for s in found.tables[0].scanned}
    assert not found.gap  # an incremental run closes no gap (a divergent one neither)

    # A dataset-wide write that is not a create: the set of keys cannot be told.
    async with data_job(config, secrets, "dcir", pg_url, actor="t", purpose="test") as job:
        async with job.journal.locked("dcir", ["*"]) as held:
            seq = await held.intent(
                record="*",
                route="/v1/datasets/{dataset}/bulk",
                method="POST",
                authority="source",
                stage_version=job.stage.version,
                request={"method": "POST", "target": "/x", "key": None, "headers": [], "body": ""},
            )
            await held.decide(seq, "pending", status=200, answer=b"{}")
    refused = run_cli(path, "verify", "dcir", "--incremental")
    assert refused.returncode == 3
    assert "name no record" in refused.stderr and "run a full sweep" in refused.stderr


async def test_a_repair_left_open_by_a_dead_job_is_settled_by_the_next(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    path, _, _ = await world(tmp_path, make_database, pg_url, 2000, Stage.DUALWRITE)
    # A repair's intent whose writer's session is gone (its process was killed).
    await execute(
        pg_url,
        "INSERT INTO bascule_journal (dataset, record, route, method, authority,"
        " stage_version, writer, writer_pid, writer_started, state, request)"
        " VALUES ('dcir', $1, 'bascule:repair', 'PUT', 'source', 2, 'bascule verify x:1',"
        " 0, now(), 'intent', '\\x00')",
        args=[token(7)],
    )
    assert run_cli(path, "verify", "dcir").returncode == 0
    left = await fetch(pg_url, "SELECT state, last_error FROM bascule_journal")
    assert [(r["state"], r["last_error"]) for r in left] == [
        ("skipped", "its repair was interrupted")
    ]
    skipped = await datajobs.audit_rows(pg_url, "journal-skip")
    assert len(skipped) == 1 and "interrupted" in skipped[0]["reason"]
