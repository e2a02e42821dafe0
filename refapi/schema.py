"""The reference API's tables, created from the dataset specs when absent."""

from __future__ import annotations

from collections.abc import Iterable

from refapi.columns import ColumnType
from refapi.datasets import DATASETS, DatasetSpec
from refapi.store import IDEMPOTENCY_TABLE, Conn

# Several instances may start on one database at once; CREATE ... IF NOT EXISTS alone races on
# the catalog, so creation is serialized on this (arbitrary, fixed) advisory lock.
_SCHEMA_LOCK = 0x7265_6661_7069  # "refapi"

# A key's answer is its status and either its body as sent (``body``) or, as writes store it
# in their own statement, the record written (``record``) and ``served_at``, from which the
# same bytes are rendered again (``refapi.records.rendered``).
_IDEMPOTENCY_DDL = f"""
CREATE TABLE IF NOT EXISTS {IDEMPOTENCY_TABLE} (
    key         text PRIMARY KEY,
    dataset     text NOT NULL,
    fingerprint bytea NOT NULL,
    status      integer NOT NULL,
    body        bytea,
    record      jsonb,
    served_at   text,
    created_at  timestamptz NOT NULL DEFAULT now()
)"""
# Tables created by an earlier version of this API lack the last two columns.
_IDEMPOTENCY_UPGRADE = (
    f"ALTER TABLE {IDEMPOTENCY_TABLE} ADD COLUMN IF NOT EXISTS record jsonb,"
    " ADD COLUMN IF NOT EXISTS served_at text"
)


def table_ddl(spec: DatasetSpec) -> str:
    lines = []
    for column in spec.all_columns:
        if column.type is ColumnType.ID:
            lines.append(f"{column.ident} bigserial PRIMARY KEY")
        elif column.server_set:
            lines.append(f"{column.ident} {column.type.sql} NOT NULL DEFAULT now()")
        else:
            null = "" if column.nullable else " NOT NULL"
            lines.append(f"{column.ident} {column.type.sql}{null}")
    for check in spec.checks:
        lines.append(f'CONSTRAINT "{check.name}" CHECK ({check.sql})')
    body = ",\n    ".join(lines)
    return f"CREATE TABLE IF NOT EXISTS {spec.table} (\n    {body}\n)"


async def ensure_schema(
    conn: Conn,
    specs: Iterable[DatasetSpec] = DATASETS.values(),
) -> None:
    """Create every dataset table and the idempotency table unless they exist."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
        for spec in specs:
            await conn.execute(table_ddl(spec))
        await conn.execute(_IDEMPOTENCY_DDL)
        await conn.execute(_IDEMPOTENCY_UPGRADE)
