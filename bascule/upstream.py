"""One backend behind one small interface: ``request()`` yields an answer to stream or read.

Bodies pass through byte for byte in both directions: the raw path and query are sent as
received, nothing is decompressed, no cookie is kept, no redirect followed.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

from bascule.config import Backend
from bascule.http1 import Body, Headers, Pool, Response, _Connection


class Upstream:
    def __init__(self, name: str, backend: Backend) -> None:
        self.name = name
        self.backend = backend
        url = urlsplit(backend.url)
        self.tls = url.scheme == "https"
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if self.tls else 80)
        self.prefix = url.path.rstrip("/")
        self._pool: Pool | None = None

    async def open(self) -> None:
        self._pool = Pool(
            self.name,
            self.host,
            self.port,
            size=self.backend.pool_size,
            connect_timeout=self.backend.connect_timeout,
            read_timeout=self.backend.read_timeout,
            tls=ssl.create_default_context() if self.tls else None,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def request(self, method: str, path_qs: str, headers: Headers, body: Body) -> Exchange:
        """Send a request; ``async with`` yields the answer with its body unread (read or
        stream it inside the block). ``path_qs``: an origin-form target (``/path?query``),
        after the backend's base path, or ``*`` (``OPTIONS *``: the server itself).

        Raises :class:`~bascule.errors.UpstreamTimeout` or ``UpstreamUnreachable`` (refused,
        reset, or garbage instead of HTTP), also while the body is being read.
        """
        assert self._pool is not None, "Upstream.open() was not called"
        target = path_qs if path_qs == "*" else self.prefix + path_qs
        return Exchange(self._pool, method, target, headers, body)


class Exchange:
    """One request and its answer; the connection goes back to the pool on exit."""

    __slots__ = ("_args", "_conn", "_pool")

    def __init__(self, pool: Pool, method: str, target: str, headers: Headers, body: Body) -> None:
        self._pool = pool
        self._args = (method, target, headers, body)
        self._conn: _Connection | None = None

    async def __aenter__(self) -> Response:
        self._conn, resp = await self._pool.send(*self._args)
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
