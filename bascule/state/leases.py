"""Short leases in Postgres: one holder at a time across the fleet, taken over once expired.

The replayer holds one per dataset (``replay:NAME``) and the controller one for the fleet
(``controller``). A holder renews its lease before it runs out; another replica takes it only
once it has expired, plus ``grace`` seconds (the time the old holder's work in flight may
still take to end).
"""

from __future__ import annotations

import contextlib

import asyncpg

from bascule.state.postgres import reaching_postgres


async def take(
    pool: asyncpg.Pool, name: str, holder: str, duration: float, grace: float = 0.0
) -> bool:
    """Take or renew ``name`` for ``duration`` seconds; False when another holder has it (or
    its lease expired less than ``grace`` seconds ago)."""
    async with reaching_postgres():
        found = await pool.fetchval(
            "INSERT INTO bascule_lease (name, holder, expires_at)"
            " VALUES ($1, $2, now() + make_interval(secs => $3))"
            " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
            " expires_at = excluded.expires_at"
            " WHERE bascule_lease.holder = excluded.holder"
            " OR bascule_lease.expires_at < now() - make_interval(secs => $4)"
            " RETURNING holder",
            name,
            holder,
            duration,
            grace,
        )
    return bool(found == holder)


async def release(pool: asyncpg.Pool, name: str, holder: str) -> None:
    """Give ``name`` up if ``holder`` has it (a stopping replica); never raises."""
    with contextlib.suppress(Exception):
        async with reaching_postgres():
            await pool.execute(
                "DELETE FROM bascule_lease WHERE name = $1 AND holder = $2", name, holder
            )


async def holder(pool: asyncpg.Pool, name: str) -> str | None:
    """Who holds ``name`` now (None: nobody, or an expired holder)."""
    async with reaching_postgres():
        found: str | None = await pool.fetchval(
            "SELECT holder FROM bascule_lease WHERE name = $1 AND expires_at > now()", name
        )
    return found
