"""Fill datasets with synthetic rows over COPY: ids 1..N, each id sequence moved past N.

Seeding replaces what a dataset held (and forgets the idempotency keys of its writes), so a
seeded database always holds exactly what the seed and the row count say.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import asyncpg

from refapi.datasets import DATASETS
from refapi.schema import ensure_schema
from refapi.store import IDEMPOTENCY_TABLE
from refapi.synth import GENERATORS


async def seed_database(
    database_url: str, rows: int, *, seed: int = 1, datasets: Sequence[str] | None = None
) -> dict[str, float]:
    """Seed ``datasets`` (all by default) with ``rows`` rows each; seconds taken per dataset."""
    names = list(DATASETS) if datasets is None else list(datasets)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset {', '.join(unknown)}; known: {', '.join(DATASETS)}")
    if rows < 0:
        raise ValueError("rows must not be negative")
    timings: dict[str, float] = {}
    conn = await asyncpg.connect(database_url)
    try:
        await ensure_schema(conn)
        for name in names:
            spec = DATASETS[name]
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute(f"TRUNCATE {spec.table}")
                await conn.execute(f"DELETE FROM {IDEMPOTENCY_TABLE} WHERE dataset = $1", name)
                await conn.copy_records_to_table(
                    spec.name,
                    records=GENERATORS[name](seed, rows),
                    columns=[c.name for c in spec.all_columns],
                )
                # is_called=false on an empty table: the next id is then 1, not 2.
                await conn.execute(
                    "SELECT setval(pg_get_serial_sequence($1, 'id'), $2, $3)",
                    spec.name,
                    max(rows, 1),
                    rows > 0,
                )
            # Fresh statistics, so the first aggregate queries are planned for the real size.
            await conn.execute(f"ANALYZE {spec.table}")
            timings[name] = time.perf_counter() - started
    finally:
        await conn.close()
    return timings
