"""bascule's own state schema: versioned SQL migrations, applied by ``bascule migrate``.

Migrations are the files ``bascule/state/migrations/NNNN_name.sql``, applied in order, each in
its own transaction, under an advisory lock so two ``migrate`` runs cannot interleave. Processes
that use the state check the version at start-up and refuse an unmigrated or newer schema.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from bascule.errors import SchemaError

# A connection, whether held directly or borrowed from a pool (a string: asyncpg's classes
# are generic only in its stubs).
Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x62617363756C65  # "bascule"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def migrations() -> list[Migration]:
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        m = _FILE.match(path.name)
        if not m:
            raise SchemaError(f"migration file {path.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), path))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise SchemaError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


LATEST = len(migrations())


async def current_version(conn: Conn) -> int:
    exists = await conn.fetchval("SELECT to_regclass('bascule_schema') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM bascule_schema"))


async def migrate(conn: Conn) -> list[Migration]:
    """Apply the migrations this database lacks; return those applied."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bascule_schema ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        have = await current_version(conn)
        if have > LATEST:
            raise SchemaError(
                f"the state schema is at version {have}, newer than this bascule knows ({LATEST}); "
                "upgrade bascule"
            )
        applied = []
        for m in migrations()[have:]:
            async with conn.transaction():
                await conn.execute(m.path.read_text())
                await conn.execute(
                    "INSERT INTO bascule_schema (version, name) VALUES ($1, $2)", m.version, m.name
                )
            applied.append(m)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def check(conn: Conn) -> None:
    """Raise :class:`SchemaError`, saying what to run, unless the schema is exactly current."""
    have = await current_version(conn)
    if have < LATEST:
        raise SchemaError(
            f"the state schema is at version {have}, this bascule needs {LATEST}: "
            "run `bascule migrate --config FILE`"
        )
    if have > LATEST:
        raise SchemaError(
            f"the state schema is at version {have}, newer than this bascule knows ({LATEST}); "
            "upgrade bascule before starting it"
        )
