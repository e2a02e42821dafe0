"""The state Postgres: how a pool on it is opened, and the one way its failures are reported."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from bascule.errors import BasculeError, StoreError
from bascule.state import schema

Reader = asyncpg.Pool | asyncpg.Connection
"""Where a query runs: a pool (a session of its own), or one session, e.g. a transaction's, so
that what it reads sees the rows that transaction has locked and holds no second session."""

UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    # A pooled connection caught mid-operation by a server restart can be left in a state
    # asyncpg reports this way; to the caller it is the same: the store is not usable now.
    asyncpg.InternalClientError,
)


@contextlib.asynccontextmanager
async def reaching_postgres() -> AsyncIterator[None]:
    """Turn the many ways a connection fails into one :class:`StoreError`."""
    try:
        yield
    except BasculeError:
        raise  # ours already say what is wrong (SchemaError is a ConnectionError too)
    except UNREACHABLE as exc:
        raise StoreError(f"the state Postgres is unreachable ({type(exc).__name__})") from exc
    except asyncpg.PostgresError as exc:
        # Too many clients, a cancelled statement, a crash restart, a bad password: to the
        # caller these all mean the state store cannot be used right now.
        raise StoreError(
            f"the state Postgres refused the operation ({type(exc).__name__})"
        ) from exc


class StatelessConnection(asyncpg.Connection):
    """A session that only ever runs self-contained statements (no SET, LISTEN, prepared
    state of its own): handing it back to its pool needs no reset round trip (asyncpg's
    ``RESET ALL; UNLISTEN *; ...`` on every release)."""

    def get_reset_query(self) -> str:
        return ""


async def open_pool(
    url: str,
    *,
    max_size: int = 10,
    connection_class: type[asyncpg.Connection] = asyncpg.Connection,
    application_name: str | None = None,
) -> asyncpg.Pool:
    """A pool on the state database that fails fast when Postgres is away (no 60 s hangs).

    ``min_size=0``: creating the pool connects nothing, so a replica can start, and keep
    serving on its last known stages, while Postgres is unreachable.
    """
    pool = asyncpg.create_pool(
        url,
        min_size=0,
        max_size=max_size,
        timeout=2.0,
        command_timeout=5.0,
        max_inactive_connection_lifetime=60.0,
        connection_class=connection_class,
        server_settings={"application_name": application_name} if application_name else None,
    )
    async with reaching_postgres():
        return await pool


async def schema_check(pool: asyncpg.Pool) -> None:
    """Refuse to run on an unmigrated or newer state schema (the error says what to run)."""
    async with reaching_postgres(), pool.acquire() as conn:
        await schema.check(conn)
