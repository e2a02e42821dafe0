"""What the stored-data tests share: backend databases seeded in the database itself, a state
database, a configuration naming them, and ``bascule verify``/``backfill`` run as an SRE runs
them (a separate process, its exit code and output)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from bascule.config import Config, Secrets, load_config
from bascule.sealing import Namer
from bascule.stages import Stage
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageRow, StageStore
from refapi.datasets import DCIR
from refapi.lab import DATASETS, migrate_state, walk
from refapi.schema import table_ddl
from tests.harness import fetch

MakeDatabase = Callable[[str], Awaitable[str]]

DCIR_ROWS = """
INSERT INTO dcir (id, patient_id, act_code, act_date, amount, prescriber_speciality, department,
                  created_at, updated_at)
SELECT g, 'P' || lpad(to_hex(g::bigint * 7919), 16, '0'),
       (ARRAY['G', 'CS', 'C', 'AMI', 'DEQP003'])[1 + g % 5], date '2023-01-01' + (g % 731)::int,
       (g % 10000) / 100.0, CASE WHEN g % 7 = 0 THEN NULL ELSE lpad((g % 17)::text, 2, '0') END,
       lpad((1 + g % 95)::text, 2, '0'), timestamptz '2023-01-01' + g * interval '1 second',
       timestamptz '2023-01-01' + g * interval '1.5 second'
FROM generate_series($1::bigint, $2::bigint) g
"""
"""dcir rows ``$1..$2`` as the reference API stores them: a pure function of the id."""

# The CLI, as a `python -c` program (run with this interpreter, not an installed script).
MAIN = "import sys\nimport bascule.cli as cli\nsys.exit(cli.main(sys.argv[1:]))\n"


def namer() -> Namer:
    return Namer(Secrets.from_env(os.environ).require("hmac_key"))


def token(key: int | str, dataset: str = "dcir") -> str:
    """The record token the proxy and the verifier give ``key``."""
    return namer().record(dataset, str(key))


async def execute(database: str, *statements: str, args: Sequence[Any] = ()) -> None:
    conn = await asyncpg.connect(database)
    try:
        for statement in statements:
            await conn.execute(statement, *args)
    finally:
        await conn.close()


async def dcir(database: str, rows: int, *, first: int = 1) -> None:
    """The reference API's dcir table with ids ``first..first+rows-1``."""
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(table_ddl(DCIR))
        if rows:
            await conn.execute(DCIR_ROWS, first, first + rows - 1)
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('dcir', 'id'), greatest(max(id), 1)) FROM dcir"
        )
        await conn.execute("VACUUM ANALYZE dcir")
    finally:
        await conn.close()


async def both(source: str, target: str, rows: int) -> None:
    """dcir seeded alike on both sides, at once."""
    await asyncio.gather(dcir(source, rows), dcir(target, rows))


async def state(database: str, *stages: Stage) -> StageRow:
    """A migrated state database, the datasets registered, dcir walked through ``stages``."""
    await migrate_state(database)
    pool = await open_pool(database, max_size=1)
    try:
        return await walk(StageStore(pool), "dcir", *stages, reason="set-up")
    finally:
        await pool.close()


def write_config(
    path: Path,
    state_url: str,
    databases: tuple[str | None, str | None],
    *,
    redis_url: str = "redis://127.0.0.1:6379/0",
    extra: str = "",
    key_format: str = "integer",
) -> Config:
    """A configuration over two backends whose databases are ``databases`` (None: unset)."""
    lines = [
        f'[state]\npostgres_url = "{state_url}"\nredis_url = "{redis_url}"\n',
        '[migration]\nsource = "azure"\ntarget = "scaleway"\n',
    ]
    for name, port, database in (("azure", 9, databases[0]), ("scaleway", 9, databases[1])):
        lines.append(f'[backends.{name}]\nurl = "http://127.0.0.1:{port}"\n')
        if database is not None:
            lines.append(f'database = "{database}"\n')
    lines.append("".join(f"[datasets.{name}]\n" for name in DATASETS))
    lines.append(
        '[[routes]]\npath = "/v1/datasets/{dataset}/records"\nmethods = ["POST"]\n'
        'kind = "write"\ncreate_id = "/record/id"\n'
        'replay_as = "PUT /v1/datasets/{dataset}/records/{id}"\n'
        '[[routes]]\npath = "/v1/datasets/{dataset}/records/{id}"\n'
        'methods = ["PUT", "PATCH", "DELETE"]\nkind = "write"\nkey = "id"\n'
        f'key_format = "{key_format}"\n'
    )
    path.write_text("\n".join(lines) + extra)
    return load_config(path)


def run_cli(config: Path, *args: str, timeout: float = 110) -> subprocess.CompletedProcess[str]:
    """``bascule ARGS`` in a process of its own, as an SRE runs it."""
    return subprocess.run(
        [sys.executable, "-c", MAIN, *args],
        env={**os.environ, "BASCULE_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def run_cli_async(config: Path, *args: str, timeout: float = 110) -> tuple[int, str, str]:
    """:func:`run_cli` without blocking this event loop (researchers keep writing)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        MAIN,
        *args,
        env={**os.environ, "BASCULE_CONFIG": str(config)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(
            f"bascule {' '.join(args)} did not end in {timeout} s; stderr: {err.decode()}"
        ) from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def report(completed: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The ``--json`` answer of a command (its stderr in the message if it is not JSON)."""
    try:
        found: dict[str, Any] = json.loads(completed.stdout)
    except ValueError:
        raise AssertionError(
            f"exit {completed.returncode}; stdout: {completed.stdout!r}; "
            f"stderr: {completed.stderr!r}"
        ) from None
    return found


async def audit_rows(state_url: str, action: str) -> list[dict[str, Any]]:
    rows = await fetch(
        state_url,
        "SELECT actor, reason, details FROM bascule_audit WHERE action = $1 ORDER BY id",
        action,
    )
    return [{**dict(r), "details": json.loads(r["details"])} for r in rows]


def report_text(stdout: str, stderr: str) -> dict[str, Any]:
    """:func:`report` of an output captured by :func:`run_cli_async`."""
    try:
        found: dict[str, Any] = json.loads(stdout)
    except ValueError:
        raise AssertionError(f"stdout: {stdout!r}; stderr: {stderr!r}") from None
    return found


async def journaled(config: Config, state_url: str, key: int, method: str) -> None:
    """A write of dcir record ``key`` in the journal as the proxy leaves it once replayed
    (applied), its key sealed in its request."""
    from cutover.job import data_job

    secrets = Secrets.from_env(os.environ)
    async with data_job(config, secrets, "dcir", state_url, actor="t", purpose="test") as job:
        record = token(key)
        async with job.journal.locked("dcir", [record]) as held:
            seq = await held.intent(
                record=record,
                route="/v1/datasets/{dataset}/records/{id}",
                method=method,
                authority="source",
                stage_version=job.stage.version,
                request={"method": method, "target": "/x", "key": str(key), "body": ""},
            )
            await held.decide(seq, "pending", status=200, answer=b"{}")
        await job.journal.applied(seq)


async def digest(database: str, table: str = "dcir") -> tuple[int, str]:
    """A table's row count and a digest of every row in key order: equal, identical tables."""
    rows = await fetch(
        database,
        f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t.id), ''))"
        f" FROM {table} t",
    )
    return rows[0][0], rows[0][1]


async def table_world(
    tmp_path: Path,
    make_database: MakeDatabase,
    pg_url: str,
    source_sql: list[str],
    target_sql: list[str],
    *stages: Stage,
) -> tuple[Config, str, str]:
    """A custom ``cepidc`` table on each side, built by the statements given."""
    source, target = await make_database("src"), await make_database("tgt")
    await execute(source, *source_sql)
    await execute(target, *target_sql)
    await state(pg_url)
    await walk_dataset(pg_url, "cepidc", *stages)
    config = write_config(tmp_path / "bascule.toml", pg_url, (source, target))
    return config, source, target


async def walk_dataset(pg_url: str, dataset: str, *stages: Stage) -> None:
    pool = await open_pool(pg_url, max_size=1)
    try:
        await walk(StageStore(pool), dataset, *stages, reason="set-up")
    finally:
        await pool.close()
