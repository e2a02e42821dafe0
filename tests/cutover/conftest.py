"""What the cutover tests share: a dataset in ``shadow`` whose gate holds."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bascule.stages import Side, Stage
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageStore
from cutover.autopilot import Action, Autopilot
from refapi.lab import migrate_state
from tests.harness import offline_config

GATE = """
[datasets.dcir.gate]
min_compared = 5
window = 60
replay_grace = 5
verification = true
"""
ROUTE = "/v1/datasets/{dataset}/records/{id}"
OTHER_ROUTE = "/v1/datasets/{dataset}/query"


@dataclass
class Gated:
    """dcir in ``shadow`` with every condition of the gate holding (evidence written
    straight into the state database); ``env`` runs ``bascule`` against it."""

    pool: asyncpg.Pool
    store: StageStore
    env: dict[str, str]
    config: Path

    async def version(self) -> int:
        return (await self.store.get("dcir")).version

    async def sql(self, statement: str, *args: Any) -> None:
        await self.pool.execute(statement, *args)

    async def counted(self, route: str, outcome: str, n: int) -> None:
        await self.sql(
            "INSERT INTO bascule_shadow_count (dataset, stage_version, route, outcome, minute, n)"
            " VALUES ('dcir', $1, $2, $3, date_trunc('minute', now()), $4)"
            " ON CONFLICT (dataset, stage_version, minute, route, outcome)"
            " DO UPDATE SET n = excluded.n",
            await self.version(),
            route,
            outcome,
            n,
        )

    async def evidence(self, table: str, **row: Any) -> None:
        """One row of the gate's evidence under dcir's current stage version."""
        columns = {"dataset": "dcir", "route": ROUTE, "stage_version": await self.version(), **row}
        names = ", ".join(columns)
        places = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        await self.sql(f"INSERT INTO {table} ({names}) VALUES ({places})", *columns.values())

    async def mismatch(self) -> None:
        await self.evidence(
            "bascule_mismatch", differences='[["body", "/record/amount", "changed"]]'
        )

    async def entry(self, state: str, age: float) -> None:
        await self.sql(
            "INSERT INTO bascule_journal (dataset, record, route, method, authority,"
            " stage_version, writer, writer_pid, writer_started, state, request, created_at)"
            " VALUES ('dcir', 'r', '/r', 'PUT', 'source', 1, 'w', pg_backend_pid(),"
            " (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()),"
            " $1, '\\x00'::bytea, now() - make_interval(secs => $2))",
            state,
            age,
        )


@pytest.fixture
async def gated(
    tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str
) -> AsyncIterator[Gated]:
    await migrate_state(pg_url)
    config = tmp_path / "bascule.toml"
    offline_config(
        config, postgres_url=pg_url, redis_url=redis_url, redis_prefix=redis_prefix, extra=GATE
    )
    pool = await open_pool(pg_url, max_size=2)
    store = StageStore(pool)
    row = await store.change("dcir", 1, Stage.DUALWRITE, actor="setup", reason="setup")
    await store.close_gap("dcir", Side.TARGET, actor="setup", reason="verified below")
    row = await store.change("dcir", row.version, Stage.SHADOW, actor="setup", reason="setup")
    world = Gated(pool, store, {**os.environ, "BASCULE_CONFIG": str(config)}, config)
    # Every condition holding: in effect for longer than the window, evidence enough, clean.
    await world.sql("UPDATE bascule_stage SET updated_at = now() - interval '2 minutes'")
    await world.sql(
        "INSERT INTO bascule_verify_run (dataset, mode, status, verified, authority, stage,"
        " stage_version, actor, started_at, swept_since, finished_at) VALUES ('dcir', 'full',"
        " 'clean', 'target', 'source', 'dualwrite', 2, 'setup', now(), now(), now())"
    )
    await world.counted(ROUTE, "compared", 10)
    await world.counted(ROUTE, "matched", 10)
    yield world
    await pool.close()


async def led(pilot: Autopilot) -> list[Action]:
    """One round of ``pilot``'s, which must get the controller's lease."""
    done = await pilot.lead()
    assert done is not None, f"{pilot.replica} did not get the controller's lease"
    return done
