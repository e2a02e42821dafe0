"""One backend behind one small interface: ``request()`` yields an answer to stream or read.

Bodies pass through byte for byte in both directions: the raw path and query are sent as
received, nothing is decompressed, no cookie is kept, no redirect followed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

from bascule.config import Backend, Route
from bascule.http1 import Body, Headers, Pool, Response, _Connection
from bascule.tls import client_context

_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Limits:
    """The time one request gets: ``read`` seconds of silence at most, ``total`` seconds in all
    (waiting for a connection, connecting, the answer's last byte)."""

    read: float
    total: float


class Upstream:
    def __init__(self, name: str, backend: Backend, *, key: str | None = None) -> None:
        """``key``: the backend's key in the configuration (``backends.NAME``), for errors."""
        self.name = name
        self.backend = backend
        self.key = key or f"backends.{name}"
        url = urlsplit(backend.url)
        self.tls = url.scheme == "https"
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if self.tls else 80)
        self.prefix = url.path.rstrip("/")
        self._pool: Pool | None = None
        self._reads = Limits(backend.read_timeout, backend.total_timeout)
        self._writes = Limits(backend.read_timeout, backend.write_timeout)

    async def open(self) -> None:
        self._pool = Pool(
            self.name,
            self.host,
            self.port,
            size=self.backend.pool_size,
            connect_timeout=self.backend.connect_timeout,
            read_timeout=self.backend.read_timeout,
            pool_timeout=self.backend.pool_timeout,
            keepalive=self.backend.keepalive_timeout,
            # The same checks on every path that calls the backend (researchers' reads and
            # writes, replays, the resolver, shadow reads in their worker process).
            tls=client_context(f"{self.key}.tls", self.backend.tls) if self.tls else None,
        )

    def retime(self, backend: Backend) -> None:
        """Take ``backend``'s timeouts (a reload, SIGHUP): the next requests get them; the
        connections open stay open."""
        self.backend = backend
        self._reads = Limits(backend.read_timeout, backend.total_timeout)
        self._writes = Limits(backend.read_timeout, backend.write_timeout)
        if self._pool is not None:
            self._pool.connect_timeout = backend.connect_timeout
            self._pool.read_timeout = backend.read_timeout
            self._pool.pool_timeout = backend.pool_timeout
            self._pool.keepalive = backend.keepalive_timeout

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def limits(self, method: str, route: Route | None = None) -> Limits:
        """The time a request gets here: the route's (``read_timeout``, ``total_timeout``) where
        it sets them, else this backend's, whose total is ``total_timeout`` for a read and
        ``write_timeout`` for a write (the route's kind; the method's for an unrouted one)."""
        write = route.kind == "write" if route is not None else method not in _SAFE
        base = self._writes if write else self._reads
        if route is None or (route.read_timeout is None and route.total_timeout is None):
            return base
        return Limits(route.read_timeout or base.read, route.total_timeout or base.total)

    def request(
        self,
        method: str,
        path_qs: str,
        headers: Headers,
        body: Body,
        *,
        route: Route | None = None,
        limits: Limits | None = None,
    ) -> Exchange:
        """Send a request; ``async with`` yields the answer with its body unread (read or
        stream it inside the block). ``path_qs``: an origin-form target (``/path?query``),
        after the backend's base path, or ``*`` (``OPTIONS *``: the server itself). Its time:
        ``limits``, or :meth:`limits` of its ``route``.

        Raises :class:`~bascule.errors.UpstreamTimeout`, ``UpstreamUnreachable`` (refused,
        reset, or garbage instead of HTTP) or ``UpstreamBusy`` (no connection free in time),
        also while the body is being read.
        """
        assert self._pool is not None, "Upstream.open() was not called"
        target = path_qs if path_qs == "*" else self.prefix + path_qs
        return Exchange(
            self._pool, method, target, headers, body, limits or self.limits(method, route)
        )


class Exchange:
    """One request and its answer; the connection goes back to the pool on exit."""

    __slots__ = ("_args", "_conn", "_limits", "_pool")

    def __init__(
        self,
        pool: Pool,
        method: str,
        target: str,
        headers: Headers,
        body: Body,
        limits: Limits,
    ) -> None:
        self._pool = pool
        self._args = (method, target, headers, body)
        self._limits = limits
        self._conn: _Connection | None = None

    async def __aenter__(self) -> Response:
        limits = self._limits
        deadline = asyncio.get_running_loop().time() + limits.total
        self._conn, resp = await self._pool.send(
            *self._args, read_timeout=limits.read, deadline=deadline, total=limits.total
        )
        return resp

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        assert self._conn is not None
        if exc is not None:
            self._conn.close()
        self._pool.release(self._conn)
        if isinstance(exc, Exception):
            translated = self._pool.error(exc)
            if translated is not exc:
                raise translated from None
