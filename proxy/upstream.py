"""One backend behind one small interface: pooled keep-alive connections, timeouts, clear errors.

Bodies pass through byte for byte: responses are not decompressed (``auto_decompress=False``),
cookies are not kept, and the caller's headers are sent as given.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from bascule.config import Backend
from bascule.errors import UpstreamTimeout, UpstreamUnreachable


def _payload(body: bytes) -> bytes | io.BytesIO | None:
    # aiohttp warns about (and would block the loop on) large raw bytes payloads.
    if not body:
        return None
    return io.BytesIO(body) if len(body) > 512 * 1024 else body


class Upstream:
    def __init__(self, name: str, backend: Backend) -> None:
        self.name = name
        self.backend = backend
        self.base = backend.url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.backend.pool_size,
            limit_per_host=self.backend.pool_size,
            keepalive_timeout=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.backend.connect_timeout,
                sock_read=self.backend.read_timeout,
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def request(
        self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send a request; yield the response with its body still unread (for streaming).

        Raises :class:`UpstreamTimeout` (no connection or no answer in time) or
        :class:`UpstreamUnreachable` (refused, reset, or garbage instead of HTTP).
        """
        assert self._session is not None, "Upstream.open() was not called"
        try:
            async with self._session.request(
                method,
                # encoded=True: the raw path and query go out byte for byte, not re-normalised.
                URL(self.base + path_qs, encoded=True),
                headers=headers,
                data=_payload(body),
                allow_redirects=False,
                compress=False,
            ) as resp:
                yield resp
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(self.name, "did not answer in time") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnreachable(
                self.name, f"cannot connect ({exc.os_error.strerror})"
            ) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise UpstreamUnreachable(self.name, "the connection broke before an answer") from exc
        except aiohttp.ClientResponseError as exc:
            raise UpstreamUnreachable(
                self.name, f"answered something that is not HTTP ({exc.message})"
            ) from exc
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamUnreachable(self.name, "the answer's body broke off") from exc
