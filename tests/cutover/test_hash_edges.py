"""Edges of row hashing, key reading and writing, on real Postgres: which values hash alike
(every NaN of a float; NaN and NaN numeric) and which apart (-0 and 0; numeric NaN, Infinity,
-Infinity, NULL), natively and as md5; journaled keys the key's type cannot hold; generated
and identity columns on one side only, written by a backfill and a repair."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from bascule.config import Secrets
from bascule.stages import Side, Stage
from cutover.backfill import BackfillOptions, backfill
from cutover.checksum import key_hashes
from cutover.findings import Options
from cutover.job import data_job
from cutover.tables import PINNED, Conn, Pair, agree, discover, hash_seed, pair
from cutover.verify import verify
from tests.cutover.datajobs import MakeDatabase, execute, table_world
from tests.harness import fetch

SEED = hash_seed(b"test_hash_edges")

# (column type, [(value as SQL, class)]): two values hash alike exactly when their classes are
# the same.
VALUES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "float8": (
        "float8",
        [
            ("0", "zero"),
            ("'-0'", "minus zero"),
            ("'NaN'", "nan"),
            ("'Infinity'::float8 - 'Infinity'::float8", "nan"),  # the sign bit set (x86)
            ("-'NaN'::float8", "nan"),
            ("'Infinity'", "inf"),
            ("'-Infinity'", "-inf"),
            ("NULL", "null"),
            ("1.5", "1.5"),
        ],
    ),
    "float4": (
        "float4",
        [
            ("0", "zero"),
            ("'-0'", "minus zero"),
            ("'NaN'", "nan"),
            ("-'NaN'::float4", "nan"),
            ("'Infinity'", "inf"),
            ("'-Infinity'", "-inf"),
            ("NULL", "null"),
        ],
    ),
    "numeric": (
        "numeric",
        [
            ("0", "0"),
            ("0.0", "0.0"),
            ("1", "1"),
            ("'NaN'", "nan"),
            ("'NaN'", "nan"),
            ("'Infinity'", "inf"),
            ("'Infinity'", "inf"),
            ("'-Infinity'", "-inf"),
            ("NULL", "null"),
        ],
    ),
    "fixed": (
        "numeric(10,2)",
        [("0", "0"), ("1.5", "1.5"), ("'NaN'", "nan"), ("'NaN'", "nan"), ("NULL", "null")],
    ),
    "domain": (
        "edges_amount",  # a domain over numeric(10,2): hashed as free-scale numeric
        [("0", "0"), ("1.5", "1.5"), ("'NaN'", "nan"), ("'NaN'", "nan"), ("NULL", "null")],
    ),
}


@pytest.fixture
async def conn(make_database: MakeDatabase) -> AsyncIterator[Conn]:
    """A session on a fresh database under the pinned settings, as a data job's."""
    database = await make_database("edges")
    statements = ["CREATE DOMAIN edges_amount AS numeric(10,2)"]
    for name, (type_, values) in VALUES.items():
        rows = ", ".join(f"({i}, {sql})" for i, (sql, _) in enumerate(values))
        statements.append(f"CREATE TABLE e_{name} (k int PRIMARY KEY, v {type_})")
        statements.append(f"INSERT INTO e_{name} VALUES {rows}")
    await execute(database, *statements)
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as c:
        for setting, value in PINNED:
            await c.execute("SELECT set_config(%s, %s, false)", (setting, value))
        yield c


async def table_pair(conn: Conn, name: str) -> Pair:
    table = await discover(conn, "edges", Side.SOURCE, name)
    return pair(name, table, table, SEED)


@pytest.mark.parametrize("native", [True, False], ids=["native", "md5"])
@pytest.mark.parametrize("name", list(VALUES))
async def test_values_hash_alike_exactly_when_they_render_alike(
    conn: Conn, name: str, native: bool
) -> None:
    """Every NaN of a float is one value (they render alike, and a repair writes 'NaN'); -0
    and 0 render apart; numeric's NaN, Infinity and -Infinity (one hash in numeric's own hash
    function, no scale) are three values, none of them NULL."""
    found = await table_pair(conn, f"e_{name}")
    # The value column only: the key would make every row's hash its own.
    only = replace(found, compared=("v",), native_hash=native)
    cur = await conn.execute(f"SELECT k, {only.row_hash()} FROM {only.name} t ORDER BY k")
    hashes: dict[int, int] = dict(await cur.fetchall())
    classes = [c for _, c in VALUES[name][1]]
    for i, a in enumerate(classes):
        for j, b in enumerate(classes):
            assert (hashes[i] == hashes[j]) == (a == b), (name, a, b)


async def test_the_servers_agree_on_a_probe_of_numeric_special_values(conn: Conn) -> None:
    assert await agree([("edges", conn), ("edges", conn)], SEED)


async def test_keys_the_key_type_cannot_hold_are_absent_not_a_failure(
    conn: Conn, make_database: MakeDatabase
) -> None:
    """Journaled keys out of the type's range or syntax (or not sendable at all) name no row:
    the others are answered, the batch does not fail."""
    found = await table_pair(conn, "e_numeric")
    keys = ["1", "99999999999999999999", "-2147483649", "x", "", "a\x00", "\ud800", "3", "1_0"]
    hashes = await key_hashes(conn, found, Side.SOURCE, keys)
    assert set(hashes) == {"1", "3"}
    assert await key_hashes(conn, found, Side.SOURCE, ["99999999999999999999"]) == {}

    u = "f47ac10b-58cc-4372-a567-0e02b2c3d479"
    await conn.execute("CREATE TEMP TABLE e_uuid (k uuid PRIMARY KEY, v int)")
    await conn.execute(f"INSERT INTO e_uuid VALUES ('{u}', 1)")
    uuids = await table_pair(conn, "e_uuid")
    assert set(await key_hashes(conn, uuids, Side.SOURCE, ["not-a-uuid", u, "12"])) == {u}


# --- generated and identity columns on one side only ---------------------------------------


PLAIN = "CREATE TABLE cepidc (code bigint PRIMARY KEY, score int, total int)"
GENERATED = (
    "CREATE TABLE cepidc (code bigint PRIMARY KEY, score int,"
    " total int GENERATED ALWAYS AS (score * 2) STORED)"
)


def rows(ddl: str, n: int) -> str:
    """Rows 1..n of cepidc (``total`` = score * 2, given where the table does not compute it)."""
    if ddl is GENERATED:
        return f"INSERT INTO cepidc (code, score) SELECT g, g FROM generate_series(1, {n}) g"
    return f"INSERT INTO cepidc SELECT g, g, g * 2 FROM generate_series(1, {n}) g"


@pytest.mark.parametrize("generated_on", ["source", "target"])
async def test_a_column_generated_on_one_side_only_is_written_where_it_is_plain(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str, generated_on: str
) -> None:
    """The target already holds some rows (its batch is staged: INSERT ... SELECT). Generated
    on the target: the target computes it; on the source only: the target is given it."""
    source_ddl, target_ddl = (GENERATED, PLAIN) if generated_on == "source" else (PLAIN, GENERATED)
    config, _, target = await table_world(
        tmp_path,
        make_database,
        pg_url,
        [source_ddl, rows(source_ddl, 1000), "ANALYZE cepidc"],
        [target_ddl, rows(target_ddl, 10), "ANALYZE cepidc"],
        Stage.DUALWRITE,
    )
    secrets = Secrets.from_env(os.environ)
    async with data_job(config, secrets, "cepidc", pg_url, actor="t", purpose="backfill") as job:
        done = await backfill(job, BackfillOptions())
    assert done.status == "done", done.as_json()
    assert done.tables[0].staged >= 1
    check = "SELECT count(*), sum(total) FROM cepidc"
    assert [tuple(r) for r in await fetch(target, check)] == [(1000, 1000 * 1001)]

    # A repair onto the same table: one row missing, one changed (its plain columns).
    changed = "score = -1" + (", total = -2" if target_ddl is PLAIN else "")
    await execute(
        target,
        "DELETE FROM cepidc WHERE code = 5",
        f"UPDATE cepidc SET {changed} WHERE code = 6",
    )
    async with data_job(config, secrets, "cepidc", pg_url, actor="t", purpose="verify") as job:
        repaired = await verify(job, Options(repair=True, reason="test"))
    assert repaired.repaired_all and repaired.repair, repaired.as_json()
    assert repaired.repair["upserted"] == 2
    assert [tuple(r) for r in await fetch(target, check)] == [(1000, 1000 * 1001)]


async def test_identity_columns_generated_always_are_written_by_a_backfill_and_a_repair(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str
) -> None:
    """The target's key and another column are GENERATED ALWAYS AS IDENTITY: a staged batch
    and a repair's upsert insert them with OVERRIDING SYSTEM VALUE; an upsert's update leaves
    the non-key one alone (an UPDATE may only set it to its default), which is equal here."""
    config, _, target = await table_world(
        tmp_path,
        make_database,
        pg_url,
        [
            "CREATE TABLE cepidc (code bigint PRIMARY KEY, n bigint, score int)",
            "INSERT INTO cepidc SELECT g, g + 10, g FROM generate_series(1, 1000) g",
            "ANALYZE cepidc",
        ],
        [
            "CREATE TABLE cepidc (code bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " n bigint GENERATED ALWAYS AS IDENTITY, score int)",
            "INSERT INTO cepidc OVERRIDING SYSTEM VALUE"
            " SELECT g, g + 10, g FROM generate_series(1, 10) g",
            "ANALYZE cepidc",
        ],
        Stage.DUALWRITE,
    )
    secrets = Secrets.from_env(os.environ)
    async with data_job(config, secrets, "cepidc", pg_url, actor="t", purpose="backfill") as job:
        done = await backfill(job, BackfillOptions())
    assert done.status == "done", done.as_json()
    assert done.tables[0].staged >= 1

    await execute(
        target,
        "DELETE FROM cepidc WHERE code = 5",
        "UPDATE cepidc SET score = -1 WHERE code = 6",
    )
    async with data_job(config, secrets, "cepidc", pg_url, actor="t", purpose="verify") as job:
        repaired = await verify(job, Options(repair=True, reason="test"))
    assert repaired.repaired_all and repaired.repair, repaired.as_json()
    assert repaired.repair["upserted"] == 2
    rows = await fetch(target, "SELECT code, n, score FROM cepidc WHERE code IN (5, 6) ORDER BY 1")
    assert [tuple(r) for r in rows] == [(5, 15, 5), (6, 16, 6)]
