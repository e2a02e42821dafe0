"""Which stage version each live replica runs: reported under a lease, awaited by flips.

Every replica reports, after each reload of the stages, the version it now runs for every
dataset, with a lease (``bascule_replica``). A change that alters writes completes only once
every replica whose lease is alive has reported the new version, or its lease has run out: a
replica frozen or cut off from Postgres stops holding a flip up once its lease expires (its
writes cannot go through anyway: they read their plan under the dataset's fence). It is not
forgotten: it still serves reads on the stages it last read, so the change names it
(:func:`unconfirmed`), with how long ago it last reported (its last read of the stages).
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
    sessions: int = 0
    """State-Postgres sessions open now under this replica's name (its pools' and its shadow
    worker's: ``bascule ROLE NAME``, :func:`bascule.state.postgres.session_name`)."""

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": self.versions,
            "seen_at": self.seen_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "alive": self.alive,
            "sessions": self.sessions,
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
    """Every replica that reported, with its state sessions open now; expired ones are
    shown, marked not alive."""
    async with reaching_postgres():
        rows = await pool.fetch(
            "WITH named AS (SELECT application_name AS app FROM pg_stat_activity"
            "  WHERE datname = current_database() AND application_name LIKE 'bascule %')"
            " SELECT name, versions, seen_at, expires_at, expires_at > now() AS alive,"
            "  (SELECT count(*) FROM named WHERE app IN (left('bascule state ' || name, 63),"
            "   left('bascule writer ' || name, 63), left('bascule shadow ' || name, 63)))"
            "  AS sessions"
            " FROM bascule_replica ORDER BY name"
        )
    return [
        Replica(
            r["name"],
            json.loads(r["versions"]),
            r["seen_at"],
            r["expires_at"],
            r["alive"],
            r["sessions"],
        )
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


@dataclass(frozen=True)
class Unconfirmed:
    """A replica seen recently that does not run a change yet."""

    name: str
    version: int | None
    """The version of the dataset it last reported running (None: it never reported one)."""
    seen_ago: float
    """Seconds since its last report, by the database's clock: it reports right after each
    read of the stages, so this is how old its stages are."""
    alive: bool
    """Its lease has not run out: it is only slow to confirm."""

    def as_json(self, stale_after: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "last_report_seconds_ago": round(self.seen_ago, 3),
            "lease_alive": self.alive,
            "stale_in_seconds": round(stale_after - self.seen_ago, 3),
        }


def described(replica: dict[str, Any]) -> str:
    """An unconfirmed replica (:meth:`Unconfirmed.as_json`) in words for an SRE: what it still
    does, and until when."""
    version = replica["version"]
    runs = f"runs version {version}" if version is not None else "never reported this dataset"
    if replica["lease_alive"]:
        return f"{replica['name']}: {runs}; its lease is alive (slow to confirm)"
    left = replica["stale_in_seconds"]
    until = (
        f"until its stages go stale in {left:.1f} s, when it reports not ready"
        if left > 0
        else f"(its stages have been stale for {-left:.1f} s: it reports not ready)"
    )
    return (
        f"{replica['name']}: {runs}; last report {replica['last_report_seconds_ago']:.1f} s ago,"
        " its lease ran out (cut off from the state Postgres, or frozen); it serves reads on its"
        f" last known stages {until}, and as long as a load balancer sends it researchers"
    )


async def unconfirmed(
    pool: asyncpg.Pool, dataset: str, version: int, *, within: float
) -> list[Unconfirmed]:
    """Replicas that reported in the last ``within`` seconds and do not run ``version`` (or
    later) of ``dataset``: live ones slow to confirm, and those whose lease ran out. A replica
    that stopped cleanly withdrew its report and is not among them."""
    async with reaching_postgres():
        rows = await pool.fetch(
            "SELECT name, (versions ->> $1)::bigint AS version,"
            " extract(epoch FROM now() - seen_at)::float8 AS ago, expires_at > now() AS alive"
            " FROM bascule_replica WHERE seen_at > now() - make_interval(secs => $3)"
            " AND coalesce((versions ->> $1)::bigint, 0) < $2 ORDER BY name",
            dataset,
            version,
            within,
        )
    return [Unconfirmed(r["name"], r["version"], max(0.0, r["ago"]), r["alive"]) for r in rows]


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
