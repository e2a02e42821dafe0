"""Record reads and writes in Postgres, one statement each, on a connection the caller holds.

Callers hold the connection (and the transaction) so that a write and its idempotency record
commit together. Statement texts depend only on the spec, so asyncpg's statement cache serves
them prepared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from refapi.datasets import DatasetSpec
from refapi.errors import Conflict, Unprocessable
from refapi.query import AggregateQuery, render_groups, to_sql
from refapi.records import RecordValues, render

# Quoted: asyncpg's classes are generic only in their stubs.
Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"
Record: TypeAlias = dict[str, object]


def _select_list(spec: DatasetSpec) -> str:
    return ", ".join(c.ident for c in spec.all_columns)


async def page(conn: Conn, spec: DatasetSpec, after: int, limit: int) -> list[Record]:
    """Up to ``limit + 1`` records with ids above ``after``: the extra one says more follow."""
    rows = await conn.fetch(
        f"SELECT {_select_list(spec)} FROM {spec.table} WHERE id > $1 ORDER BY id LIMIT $2",
        after,
        limit + 1,
    )
    return [render(spec, row) for row in rows]


async def get(conn: Conn, spec: DatasetSpec, record_id: int) -> Record | None:
    row = await conn.fetchrow(
        f"SELECT {_select_list(spec)} FROM {spec.table} WHERE id = $1", record_id
    )
    return None if row is None else render(spec, row)


async def create(conn: Conn, spec: DatasetSpec, record: RecordValues) -> Record:
    """Insert with the next id of the table's sequence; the server sets both timestamps."""
    names = [c.name for c in spec.columns]
    params = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    sql = (
        f"INSERT INTO {spec.table} ({', '.join(c.ident for c in spec.columns)}) "
        f"VALUES ({params}) RETURNING {_select_list(spec)}"
    )
    row = await _write(conn, spec, sql, *(record.values[n] for n in names))
    assert row is not None
    return render(spec, row)


async def upsert(
    conn: Conn, spec: DatasetSpec, record_id: int, record: RecordValues
) -> tuple[Record, bool]:
    """Insert or replace the record with this id; True when it was created.

    An explicit id does not touch the sequence, as in any Postgres-backed API: ids a PUT
    creates ahead of the sequence collide with later POSTs until the sequence is moved past them.
    Timestamps given are stored as given; absent, a new record gets now() for both and a
    replaced one keeps its created_at.
    """
    own = [c.ident for c in spec.columns]
    n = len(own)
    values = ", ".join(f"${i}" for i in range(2, n + 2))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in own)
    sql = (
        f"INSERT INTO {spec.table} AS t (id, {', '.join(own)}, created_at, updated_at) "
        f"VALUES ($1, {values}, COALESCE(${n + 2}::timestamptz, now()), "
        f"COALESCE(${n + 3}::timestamptz, now())) "
        f"ON CONFLICT (id) DO UPDATE SET {updates}, "
        f"created_at = CASE WHEN ${n + 2}::timestamptz IS NULL THEN t.created_at "
        f"ELSE EXCLUDED.created_at END, updated_at = EXCLUDED.updated_at "
        # xmax is 0 on a freshly inserted row version and set on one that replaced another.
        f"RETURNING {_select_list(spec)}, (xmax = 0) AS inserted"
    )
    row = await _write(
        conn,
        spec,
        sql,
        record_id,
        *(record.values[c.name] for c in spec.columns),
        record.created_at,
        record.updated_at,
    )
    assert row is not None
    return render(spec, row), bool(row["inserted"])


async def patch(
    conn: Conn, spec: DatasetSpec, record_id: int, record: RecordValues
) -> Record | None:
    """Change the given columns and stamp updated_at; None when there is no such record."""
    names = list(record.values)
    sets = ", ".join(f"{spec.by_name[n].ident} = ${i}" for i, n in enumerate(names, start=2))
    sql = (
        f"UPDATE {spec.table} SET {sets}, updated_at = now() WHERE id = $1 "
        f"RETURNING {_select_list(spec)}"
    )
    row = await _write(conn, spec, sql, record_id, *(record.values[n] for n in names))
    return None if row is None else render(spec, row)


async def delete(conn: Conn, spec: DatasetSpec, record_id: int) -> bool:
    status = await conn.execute(f"DELETE FROM {spec.table} WHERE id = $1", record_id)
    return status == "DELETE 1"


async def aggregate(conn: Conn, query: AggregateQuery) -> list[object]:
    sql, args = to_sql(query)
    rows = await conn.fetch(sql, *args)
    return render_groups(query, rows)


async def _write(
    conn: Conn, spec: DatasetSpec, sql: str, *args: object
) -> Mapping[str, Any] | None:
    try:
        return await conn.fetchrow(sql, *args)
    except asyncpg.UniqueViolationError:
        # Only the primary key is unique: a POST drew an id that a PUT had already taken.
        raise Conflict(
            "id_conflict",
            f"the next id of {spec.name} is already taken (a PUT created it ahead of the "
            "sequence); retry, or move the sequence past the highest id",
        ) from None
    except asyncpg.CheckViolationError as exc:
        check = next((c for c in spec.checks if c.name == exc.constraint_name), None)
        message = check.message if check else f"violates {exc.constraint_name}"
        raise Unprocessable("constraint_violated", message) from None
