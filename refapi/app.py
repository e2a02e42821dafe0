"""The reference API as an aiohttp application: routes, middlewares, and its database pool."""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence

import asyncpg
from aiohttp import web

from refapi.auth import TokenSet
from refapi.auth import middleware as auth_middleware
from refapi.handlers import add_routes
from refapi.middleware import envelope
from refapi.schema import ensure_schema
from refapi.state import POOL, RECEIVED, RECEIVED_KEPT, SETTINGS, Received, Settings

# A record or a query is a few hundred bytes; anything near this is a mistake or an attack.
MAX_BODY_BYTES = 64 * 1024


def create_app(
    name: str,
    database_url: str,
    tokens: Sequence[str],
    *,
    honour_idempotency: bool = True,
    pool_size: int = 10,
    received: deque[Received] | None = None,
) -> web.Application:
    """An app serving the datasets of ``database_url``; ``ValueError`` if no token is given.
    ``received``: where it records each request's trace context (``RECEIVED``; one of its own
    by default), so that a test can see what bascule propagated.

    The pool opens, and the tables are created if absent, when the app starts (not here).
    """
    settings = Settings(
        name=name,
        database_url=database_url,
        tokens=TokenSet(tokens),
        honour_idempotency=honour_idempotency,
        pool_size=pool_size,
    )
    app = web.Application(
        middlewares=[envelope(name, MAX_BODY_BYTES), auth_middleware(settings.tokens)],
        client_max_size=MAX_BODY_BYTES,
    )
    app[SETTINGS] = settings
    app[RECEIVED] = received if received is not None else deque(maxlen=RECEIVED_KEPT)
    app.cleanup_ctx.append(_database)
    add_routes(app)
    return app


class _Connection(asyncpg.Connection):
    """A pooled connection handed back with no reset round trip: requests leave no session
    state (advisory locks are transaction-scoped, nothing is SET, listened or left open), and
    asyncpg still rolls back a transaction left open."""

    def get_reset_query(self) -> str:
        return ""


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=1,
        max_size=settings.pool_size,
        connection_class=_Connection,
    )
    try:
        async with pool.acquire() as conn:
            await ensure_schema(conn)
        app[POOL] = pool
        yield
    finally:
        await pool.close()


def tls_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """https for the reference API (tests of bascule's TLS to its backends): this certificate
    and key, and, with ``client_ca``, client certificates required and checked against it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
