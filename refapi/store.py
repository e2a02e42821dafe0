"""Record reads and writes in Postgres, one statement each, on a connection the caller holds.

A write may run under a :class:`Claim`: the same statement writes only if the request's
idempotency key is not recorded yet, and records it with the answer, so a write and its
idempotency record commit together, in one round trip (``refapi/idempotency.py``). Statement
texts depend only on the spec and on whether a key is given, so asyncpg's statement cache
serves them prepared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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

IDEMPOTENCY_TABLE = "idempotency_keys"


@dataclass(frozen=True, slots=True)
class Claim:
    """An ``Idempotency-Key`` a write records in its own statement, with the answer it gets."""

    key: str
    dataset: str
    fingerprint: bytes
    served_at: str
    """The answer's ``served_at``, fixed before the write so that the statement stores it."""


class KeyTaken(Exception):
    """The write's key was already taken (by a committed write): nothing was written."""


def _keyed(write: str, first: int, status: str, record: str) -> str:
    """``write`` under an idempotency key, in one statement: it writes only if the key is not
    recorded yet, and records the key with its answer — ``status`` and ``record`` (SQL over the
    row ``w`` written; the body is rendered from them, see :func:`refapi.records.rendered`) —
    in the same statement. The key's values are parameters ``first`` to ``first + 3``: key,
    dataset, fingerprint, served_at.

    One row comes back whatever happened: ``taken`` (the key was recorded before this
    statement began: nothing was written), then what ``write`` returns (NULLs when it wrote
    nothing). A concurrent request holding the same key makes the key's insert wait for it; if
    it commits, this statement fails as a whole (a unique violation of the key), its write
    undone."""
    k = first
    guard = f"NOT EXISTS (SELECT FROM {IDEMPOTENCY_TABLE} WHERE key = ${k})"
    return (
        f"WITH w AS ({write.replace('{guard}', guard)}),"
        f" answer AS (INSERT INTO {IDEMPOTENCY_TABLE}"
        " (key, dataset, fingerprint, served_at, status, record)"
        f" SELECT ${k}, ${k + 1}, ${k + 2}, ${k + 3}, {status}, {record} FROM w)"
        f" SELECT EXISTS (SELECT FROM {IDEMPOTENCY_TABLE} WHERE key = ${k}) AS taken, w.*"
        " FROM (VALUES (0)) AS one LEFT JOIN w ON true"
    )


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


async def create(
    conn: Conn, spec: DatasetSpec, record: RecordValues, claim: Claim | None = None
) -> Record:
    """Insert with the next id of the table's sequence; the server sets both timestamps."""
    names = [c.name for c in spec.columns]
    params = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    rows = f"SELECT {params} WHERE {{guard}}" if claim else f"VALUES ({params})"
    sql = (
        f"INSERT INTO {spec.table} ({', '.join(c.ident for c in spec.columns)}) "
        f"{rows} RETURNING {_select_list(spec)}"
    )
    row = await _run(conn, spec, sql, [record.values[n] for n in names], claim, "201")
    assert row is not None
    return render(spec, row)


async def upsert(
    conn: Conn,
    spec: DatasetSpec,
    record_id: int,
    record: RecordValues,
    claim: Claim | None = None,
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
    row_values = (
        f"$1, {values}, COALESCE(${n + 2}::timestamptz, now()), "
        f"COALESCE(${n + 3}::timestamptz, now())"
    )
    rows = f"SELECT {row_values} WHERE {{guard}}" if claim else f"VALUES ({row_values})"
    sql = (
        f"INSERT INTO {spec.table} AS t (id, {', '.join(own)}, created_at, updated_at) "
        f"{rows} "
        f"ON CONFLICT (id) DO UPDATE SET {updates}, "
        f"created_at = CASE WHEN ${n + 2}::timestamptz IS NULL THEN t.created_at "
        f"ELSE EXCLUDED.created_at END, updated_at = EXCLUDED.updated_at "
        # xmax is 0 on a freshly inserted row version and set on one that replaced another.
        f"RETURNING {_select_list(spec)}, (xmax = 0) AS inserted"
    )
    args = [
        record_id,
        *(record.values[c.name] for c in spec.columns),
        record.created_at,
        record.updated_at,
    ]
    status = "CASE WHEN w.inserted THEN 201 ELSE 200 END"
    row = await _run(conn, spec, sql, args, claim, status)
    assert row is not None
    return render(spec, row), bool(row["inserted"])


async def patch(
    conn: Conn,
    spec: DatasetSpec,
    record_id: int,
    record: RecordValues,
    claim: Claim | None = None,
) -> Record | None:
    """Change the given columns and stamp updated_at; None when there is no such record."""
    names = list(record.values)
    sets = ", ".join(f"{spec.by_name[n].ident} = ${i}" for i, n in enumerate(names, start=2))
    sql = (
        f"UPDATE {spec.table} SET {sets}, updated_at = now() "
        f"WHERE id = $1{' AND {guard}' if claim else ''} RETURNING {_select_list(spec)}"
    )
    args = [record_id, *(record.values[n] for n in names)]
    row = await _run(conn, spec, sql, args, claim, "200")
    return None if row is None else render(spec, row)


async def delete(conn: Conn, spec: DatasetSpec, record_id: int, claim: Claim | None = None) -> bool:
    if claim is None:
        status = await conn.execute(f"DELETE FROM {spec.table} WHERE id = $1", record_id)
        return status == "DELETE 1"
    sql = f"DELETE FROM {spec.table} WHERE id = $1 AND {{guard}} RETURNING id"
    return await _run(conn, spec, sql, [record_id], claim, "204", record=None) is not None


async def aggregate(conn: Conn, query: AggregateQuery) -> list[object]:
    sql, args = to_sql(query)
    rows = await conn.fetch(sql, *args)
    return render_groups(query, rows)


async def _run(
    conn: Conn,
    spec: DatasetSpec,
    write: str,
    args: Sequence[object],
    claim: Claim | None,
    status: str,
    *,
    record: str | None = "to_jsonb(w)",
) -> Mapping[str, Any] | None:
    """The row ``write`` returns (None if it wrote nothing). Under ``claim``, ``write`` has a
    ``{guard}`` for its condition and the key is recorded with the answer's ``status`` and
    ``record`` (see :func:`_keyed`); :class:`KeyTaken` when the key was already taken, and
    nothing was written."""
    if claim is None:
        return await _write(conn, spec, write, *args)
    sql = _keyed(write, len(args) + 1, status, record or "NULL::jsonb")
    try:
        row = await _write(
            conn, spec, sql, *args, claim.key, claim.dataset, claim.fingerprint, claim.served_at
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == f"{IDEMPOTENCY_TABLE}_pkey":
            raise KeyTaken(claim.key) from None  # taken meanwhile: this write was undone
        raise
    assert row is not None  # one row, whatever was written
    if row["taken"]:
        raise KeyTaken(claim.key)
    return None if row["id"] is None else row


async def _write(
    conn: Conn, spec: DatasetSpec, sql: str, *args: object
) -> Mapping[str, Any] | None:
    try:
        return await conn.fetchrow(sql, *args)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == f"{IDEMPOTENCY_TABLE}_pkey":
            raise  # an idempotency key taken meanwhile (see _run)
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
