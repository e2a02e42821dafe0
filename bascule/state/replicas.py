"""Which stage version each live replica runs: reported under a lease, awaited by flips.

Every replica reports, after each reload of the stages, the version it now runs for every
dataset, with a lease (``bascule_replica``). A change that alters writes completes only once
every replica whose lease is alive has reported the new version, or its lease has run out: a
replica frozen or cut off from Postgres stops holding a flip up once its lease expires (its
writes cannot go through anyway: they read their plan under the dataset's fence).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from bascule.state.postgres import reaching_postgres


@dataclass(frozen=True)
class Replica:
    name: str
    versions: dict[str, int]
    seen_at: datetime
    expires_at: datetime
    alive: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": self.versions,
            "seen_at": self.seen_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "alive": self.alive,
        }


async def report(pool: asyncpg.Pool, name: str, versions: dict[str, int], lease: float) -> None:
    """Say which version of each dataset's stage this replica runs, for ``lease`` seconds."""
    async with reaching_postgres():
        await pool.execute(
            "INSERT INTO bascule_replica (name, versions, seen_at, expires_at)"
            " VALUES ($1, $2::jsonb, now(), now() + make_interval(secs => $3))"
            " ON CONFLICT (name) DO UPDATE SET versions = excluded.versions,"
            " seen_at = excluded.seen_at, expires_at = excluded.expires_at",
            name,
            json.dumps(versions),
            lease,
        )


async def withdraw(pool: asyncpg.Pool, name: str) -> None:
    """A replica stopping: no flip should wait for it."""
    async with reaching_postgres():
        await pool.execute("DELETE FROM bascule_replica WHERE name = $1", name)


async def listing(pool: asyncpg.Pool) -> list[Replica]:
    """Every replica that reported; expired ones are shown, marked not alive."""
    async with reaching_postgres():
        rows = await pool.fetch(
            "SELECT name, versions, seen_at, expires_at, expires_at > now() AS alive"
            " FROM bascule_replica ORDER BY name"
        )
    return [
        Replica(r["name"], json.loads(r["versions"]), r["seen_at"], r["expires_at"], r["alive"])
        for r in rows
    ]


async def lagging(pool: asyncpg.Pool, dataset: str, version: int) -> list[str]:
    """Live replicas that do not run ``version`` (or later) of ``dataset`` yet."""
    async with reaching_postgres():
        rows = await pool.fetch(
            "SELECT name FROM bascule_replica WHERE expires_at > now()"
            " AND coalesce((versions ->> $1)::bigint, 0) < $2 ORDER BY name",
            dataset,
            version,
        )
    return [r["name"] for r in rows]


async def confirmed(
    pool: asyncpg.Pool, dataset: str, version: int, *, timeout: float, every: float = 0.1
) -> list[str]:
    """Wait until every live replica runs ``version`` of ``dataset`` or its lease has run out;
    return the replicas still lagging when ``timeout`` passed (empty: confirmed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        behind = await lagging(pool, dataset, version)
        if not behind or loop.time() >= deadline:
            return behind
        await asyncio.sleep(every)
