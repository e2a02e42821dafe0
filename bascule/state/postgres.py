"""The state Postgres: how a pool on it is opened, and the one way its failures are reported."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from bascule.errors import BasculeError, StoreError
from bascule.state import schema

log = logging.getLogger("bascule.state")

DEAD_SESSION_AFTER = 30.0
"""Seconds after which a state session that stopped answering is dropped by both ends
(``[state] dead_session_after``, :class:`Probes`)."""
IDLE_IN_TRANSACTION = 60.0
"""Seconds a replica's or the CLI's session may sit idle inside a transaction (theirs only
ever run statements, in milliseconds): then the server ends it, and its row locks with it."""

CHECK_CLIENT = 1.0
"""Seconds between a writer session's checks, while a statement waits, that its replica is
still connected (``client_connection_check_interval``)."""

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


class Probes:
    """How both ends of a state session find out that the other stopped answering: TCP
    keepalive probes once it has been idle for ``idle`` seconds, every ``interval``, and
    ``TCP_USER_TIMEOUT``: the connection is dropped once nothing has been heard for ``bound``
    seconds with a probe or data unacknowledged. Postgres applies its side per session
    (``tcp_keepalives_*``, ``tcp_user_timeout``): a replica cut off by a partition, or whose
    host vanished, loses its sessions and their record locks within ``bound`` (plus a probe
    interval) instead of the server's default two hours. A frozen process keeps them: its
    kernel still answers the probes (see docs/decisions.md)."""

    def __init__(self, bound: float) -> None:
        self.bound = bound
        self.idle = max(1, int(bound / 2))
        self.count = 4
        self.interval = max(1, int((bound - self.idle) / self.count))
        self.user_timeout_ms = max(1000, int(bound * 1000))

    def server_settings(self) -> dict[str, str]:
        """The session settings that make the server's side of the socket probe."""
        return {
            "tcp_keepalives_idle": str(self.idle),
            "tcp_keepalives_interval": str(self.interval),
            "tcp_keepalives_count": str(self.count),
            "tcp_user_timeout": str(self.user_timeout_ms),
        }

    def apply(self, conn: Any) -> None:
        """The same on the client's side of ``conn``'s socket (asyncpg has no option for it)."""
        transport = getattr(conn, "_transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # a Unix socket: nothing in between can vanish
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, self.idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, self.interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, self.count)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.user_timeout_ms)
        except (OSError, AttributeError) as exc:  # a platform without one of them
            log.debug("state session probes not set on the client side: %s", exc)


def session_name(role: str, replica: str) -> str:
    """The ``application_name`` of a replica's state sessions (``bascule ROLE REPLICA``): what
    ``bascule status`` counts a replica's sessions by, and what names the replica holding a
    dataset's fence when a change has to wait. Postgres keeps 63 bytes of it."""
    return f"bascule {role} {replica}"[:63]


async def open_pool(
    url: str,
    *,
    max_size: int = 10,
    connection_class: type[asyncpg.Connection] = asyncpg.Connection,
    application_name: str | None = None,
    dead_session_after: float = DEAD_SESSION_AFTER,
    idle_in_transaction: float | None = None,
    check_client: float | None = None,
) -> asyncpg.Pool:
    """A pool on the state database that fails fast when Postgres is away (no 60 s hangs).

    ``min_size=0``: creating the pool connects nothing, so a replica can start, and keep
    serving on its last known stages, while Postgres is unreachable. Every session probes
    its peer both ways (:class:`Probes`): one that stopped answering is dropped, with its
    locks, within ``dead_session_after`` seconds. ``idle_in_transaction``: seconds a session
    may sit idle inside a transaction before the server ends it (for pools whose transactions
    only ever run statements: a client frozen mid-transaction must not hold its row locks).
    ``check_client``: seconds between the server's checks, while a statement runs, that its
    client is still there (``client_connection_check_interval``, Postgres 14 and later): a
    statement whose client went away mid-wait ends instead of going on for nobody.
    """
    probes = Probes(dead_session_after)
    settings = probes.server_settings()
    if application_name:
        settings["application_name"] = application_name
    if idle_in_transaction is not None:
        settings["idle_in_transaction_session_timeout"] = f"{int(idle_in_transaction * 1000)}ms"
    if check_client is not None:
        settings["client_connection_check_interval"] = f"{int(check_client * 1000)}ms"

    async def probing(conn: asyncpg.Connection) -> None:
        probes.apply(conn)

    pool = asyncpg.create_pool(
        url,
        connect=connect_probing,
        min_size=0,
        max_size=max_size,
        timeout=2.0,
        command_timeout=5.0,
        max_inactive_connection_lifetime=60.0,
        connection_class=connection_class,
        server_settings=settings,
        init=probing,
    )
    async with reaching_postgres():
        return await pool


async def connect_probing(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect``, and again without the probes' session settings if the server
    refuses them (a Postgres before 12 has no ``tcp_user_timeout``; some platforms support
    none of them): a replica then runs on the server's own keepalive, and says so."""
    try:
        return await asyncpg.connect(*args, **kwargs)
    except asyncpg.PostgresError as exc:
        settings = kwargs.get("server_settings") or {}
        if not any(k.startswith(_OPTIONAL) and k in str(exc) for k in settings):
            raise
        log.warning(
            "the state Postgres refused the session probes (%s): a replica cut off from it "
            "keeps its record locks for the server's own TCP keepalive time, and a write "
            "whose client went away waits for its lock to the end",
            type(exc).__name__,
        )
        kwargs["server_settings"] = {
            k: v for k, v in settings.items() if not k.startswith(_OPTIONAL)
        }
        return await asyncpg.connect(*args, **kwargs)


_OPTIONAL = ("tcp_", "client_connection_check_interval")
"""Session settings a server may not know (before Postgres 12 and 14, or on some platforms)."""


async def schema_check(pool: asyncpg.Pool) -> None:
    """Refuse to run on an unmigrated or newer state schema (the error says what to run)."""
    async with reaching_postgres(), pool.acquire() as conn:
        await schema.check(conn)


async def vacuum_check(pool: asyncpg.Pool) -> None:
    """Say in the log if the state Postgres does not vacuum (a replica's start: not every CLI
    command's)."""
    async with reaching_postgres():
        vacuums = await pool.fetchval("SELECT current_setting('autovacuum')::bool")
    if not vacuums:
        log.warning(
            "autovacuum is off on the state Postgres: the journal, a queue that leaves two dead"
            " row versions per write, then grows until someone runs VACUUM on it"
            " (docs/operations.md)"
        )
