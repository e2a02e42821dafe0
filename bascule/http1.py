"""A lean HTTP/1.1 client for the hot path: pooled keep-alive connections parsed by httptools.

Every researcher request crosses one of these, so its cost is the proxy's cost: measured by
``bench/proxy_overhead.py``, aiohttp's general-purpose client spent about as much CPU per
request as the whole aiohttp server side. This client does only what a reverse proxy needs —
send bytes as given, parse the answer (llhttp, via httptools), stream large bodies with flow
control — and nothing else (no redirects, cookies, decompression, proxies, retries of writes).

Errors are :class:`UpstreamTimeout`, :class:`UpstreamUnreachable` or :class:`UpstreamBusy`;
each says whether the request may have reached the backend (``sent``), which the write path
needs to know.

Time limits (``[backends.X]``, a route's overrides): a connection slot is waited for at most
``pool_timeout``, a connection opened within ``connect_timeout``; the backend may stay silent
``read_timeout`` (the clock restarts with every byte, and stops while the consumer does not
read); the whole exchange, from asking for a slot to the last byte, ends by its deadline
(``total_timeout``/``write_timeout``): then the connection is closed and its slot given back,
even if the consumer never reads again. An idle connection is reused only within
``keepalive_timeout``.

A request body is bytes, or :class:`Streamed`: sent as it arrives from the researcher, with
flow control both ways, so the proxy never holds it whole. An answer's trailers (the fields
after a chunked body) are dropped: they never become headers (an answer's headers go to the
researcher before its body, and the journal keeps the header section only).
"""

from __future__ import annotations

import asyncio
import collections
import re
import ssl
import time
import typing
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import httptools
from multidict import CIMultiDict

from bascule.errors import UpstreamBusy, UpstreamTimeout, UpstreamUnreachable

_HIGH_WATER = 256 * 1024  # buffered body bytes before we stop reading from the backend
_LOW_WATER = 64 * 1024
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.6.2: a method is a token
Headers = Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Streamed:
    """A request body sent as it arrives: ``length`` bytes (its ``Content-Length``) from
    ``chunks``. It goes on a fresh connection and is never re-sent (it cannot be read twice)."""

    length: int
    chunks: AsyncIterator[bytes]


Body = bytes | Streamed


_CERTIFICATE_ALERT = re.compile(
    r"ALERT_(CERTIFICATE_REQUIRED|BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_UNKNOWN"
    r"|UNSUPPORTED_CERTIFICATE|CERTIFICATE_EXPIRED|CERTIFICATE_REVOKED|HANDSHAKE_FAILURE)"
)
"""Alerts a server sends while it checks a client's certificate, in the handshake."""


def tls_failure(error: ssl.SSLError) -> str:
    """An SSL failure in words for the researcher's answer and the log (no record value can be
    in it: it is about certificates)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"its TLS certificate was refused: {error.verify_message}"
    reason = (error.reason or type(error).__name__).lower().replace("_", " ")
    if "alert" in reason and "certificate" in reason:
        return (
            f"it refused bascule's TLS session ({reason}): it wants a client certificate "
            "bascule does not have, or does not trust the one bascule presented"
        )
    if "alert" in reason:
        return f"it refused bascule's TLS session ({reason})"
    return f"the TLS handshake failed ({reason})"


class _Failure(Exception):
    """Internal: how a connection failed; turned into an Upstream* error by the pool."""

    def __init__(self, kind: str, message: str, *, sent: bool, got_bytes: bool) -> None:
        self.kind, self.sent, self.got_bytes = kind, sent, got_bytes
        super().__init__(message)


class Response:
    """An answer whose body may still be arriving. Read it with :meth:`read` or
    :meth:`iter_chunks`, then :meth:`release` (the pool's context manager does it)."""

    __slots__ = ("_conn", "_headers", "content_length", "raw_headers", "status")

    def __init__(self, conn: _Connection, status: int, raw_headers: list[tuple[str, str]]) -> None:
        self._conn = conn
        self.status = status
        self.raw_headers = raw_headers
        """The headers as received, in order (names as the backend spelled them)."""
        self._headers: CIMultiDict[str] | None = None
        self.content_length = conn.content_length

    @property
    def headers(self) -> CIMultiDict[str]:
        if self._headers is None:
            self._headers = CIMultiDict(self.raw_headers)
        return self._headers

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks()])

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            while conn.body:
                chunk = conn.body.popleft()
                conn.buffered -= len(chunk)
                if conn.paused and conn.buffered < _LOW_WATER:
                    conn.resume()
                yield chunk
            if conn.complete:
                return
            if conn.failure is not None:
                raise conn.failure
            await conn.wait()


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.last_used = time.monotonic()
        self.reused = False
        self.tls = False
        """Over TLS (a backend that refuses bascule's client certificate in TLS 1.3 says so
        only after the handshake, by ending the session before any answer)."""
        self.slot: asyncio.Semaphore | None = None
        """The pool slot this connection holds while in use; given back once (:meth:`free`)."""
        self.deadline: float | None = None
        """Loop time by which the exchange ends, answer read or not (None: no deadline)."""
        self.total = 0.0
        """The exchange's whole time limit, for messages."""
        self.expired = False
        self._reset(head=False)

    def _reset(self, *, head: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head = head
        self.raw_headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.chunked = False
        self.status = 0
        self.headers_done: asyncio.Future[None] | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.complete = False
        self.failure: _Failure | None = None
        self.got_bytes = False
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.read_timeout = 0.0
        self.last_activity = 0.0
        self.keep_alive = False
        self.trailers = False
        """The answer's header section is over: any field now is a trailer."""
        self.sending = False
        self.cut = False
        """The request's body was not sent whole: the connection cannot be reused."""
        self.writable: asyncio.Future[None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = typing.cast(asyncio.Transport, transport)

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        self._writable()

    def _writable(self) -> None:
        writable, self.writable = self.writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_activity = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail("garbage", f"answered something that is not HTTP ({exc})")
            self.close()

    def eof_received(self) -> bool | None:
        self.closed = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable()
        if not self.complete:
            delimited_by_close = (
                self.headers_done is not None
                and self.headers_done.done()
                and exc is None
                and self.failure is None
                and self.content_length is None
                and not self.chunked
            )
            if delimited_by_close:
                # An answer with neither length nor chunking ends when the backend closes.
                self.keep_alive = False
                self.on_message_complete()
            elif isinstance(exc, ssl.SSLError) and not self.got_bytes:
                # A certificate alert ends the handshake of a new session, before the
                # backend's application has a byte: that request was never processed. Any
                # other TLS error (a corrupt record...) may come after it was.
                handshake = _CERTIFICATE_ALERT.search(exc.reason or "") is not None
                self._fail("tls", tls_failure(exc), sent=not (handshake and not self.reused))
            elif self.tls and not self.reused and not self.got_bytes:
                # In TLS 1.3 a backend refuses a missing or untrusted client certificate
                # after the handshake, and asyncio reports its alert as a plain close: the
                # same as a backend dying on the request, so the write stays in doubt.
                self._fail(
                    "broken",
                    "the new TLS connection was closed before any answer: the backend "
                    "refused bascule's client certificate (none is configured, or the "
                    "backend does not trust it), or failed on the request",
                )
            elif self.headers_done is None or not self.headers_done.done():
                self._fail("broken", "the connection broke before an answer")
            else:
                self._fail("broken", "the answer's body broke off")

    # -- httptools callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.trailers:
            return  # a trailer: dropped, never merged into the headers
        text = value.decode("latin-1")
        lower = name.lower()
        if lower == b"content-length" and text.isdigit():
            self.content_length = int(text)
        elif lower == b"transfer-encoding" and "chunked" in text.lower():
            self.chunked = True
        self.raw_headers.append((name.decode("latin-1"), text))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.raw_headers = []  # informational: the real answer follows
            self.content_length = None
            self.chunked = False
            return
        self.status = status
        self.trailers = True
        self.keep_alive = self.parser.should_keep_alive()
        if self.headers_done is not None and not self.headers_done.done():
            self.headers_done.set_result(None)
        if self.head:
            # No body follows an answer to HEAD whatever its Content-Length says; httptools
            # cannot be told so, hence this connection is not reused.
            self.keep_alive = False
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:
            return  # the end of an informational answer
        if self.complete:
            return
        self.complete = True
        if self.deadline is None:
            self._cancel_timer()
        # else kept until the slot is given back: a consumer that stalls on an answer read
        # whole still gives the slot back at the deadline.
        self._wake()

    # -- the request ------------------------------------------------------------------------

    async def request(
        self,
        head: bytes,
        body: Body,
        *,
        is_head: bool,
        timeout: float,
        deadline: float | None = None,
        total: float = 0.0,
    ) -> Response:
        self._reset(head=is_head)
        assert self.transport is not None
        self.headers_done = self.loop.create_future()
        self.read_timeout = timeout
        self.deadline, self.total = deadline, total
        self._arm_timer()
        if isinstance(body, Streamed):
            self.transport.write(head)
            await self._stream(body)
        else:
            self.transport.write(head + body if body and len(body) < 65536 else head)
            if body and len(body) >= 65536:
                self.transport.write(body)
        await self.headers_done
        return Response(self, self.status, self.raw_headers)

    async def _stream(self, body: Streamed) -> None:
        """Send a body as it arrives, as fast as the backend takes it. The read timeout
        counts from its end: until then the backend waits for the researcher, not we for it."""
        assert self.transport is not None and self.headers_done is not None
        self.sending = True
        sent = 0
        try:
            async for chunk in body.chunks:
                if self.closed or self.failure is not None or self.headers_done.done():
                    break  # the backend answered (or broke) before taking it all
                sent += len(chunk)
                self.transport.write(chunk)
                if self.writable is not None:
                    await self.writable
        finally:
            self.sending = False
            self.last_activity = self.loop.time()
        if sent != body.length:
            self.cut = True  # the backend may read what follows as the rest of this body

    def resume(self) -> None:
        self.paused = False
        self.last_activity = self.loop.time()
        if self.transport is not None:
            self.transport.resume_reading()

    async def wait(self) -> None:
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and not self.cut
            and not self.closed
            and not self.expired
            and self.failure is None
        )

    def free(self) -> None:
        """Give the pool slot back, once (at release, or at the deadline, whichever is first)."""
        slot, self.slot = self.slot, None
        if slot is not None:
            if self.complete:
                self._cancel_timer()  # it only kept watch over the slot
            slot.release()

    def close(self) -> None:
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, kind: str, message: str, *, sent: bool = True) -> None:
        if self.failure is not None or self.complete:
            return
        self.failure = _Failure(kind, message, sent=sent, got_bytes=self.got_bytes)
        self._cancel_timer()
        if self.headers_done is not None and not self.headers_done.done():
            self.headers_done.set_exception(self.failure)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.failure)

    def _arm_timer(self) -> None:
        self._cancel_timer()
        self.last_activity = self.loop.time()
        due = self.last_activity + self.read_timeout
        if self.deadline is not None:
            due = min(due, self.deadline)
        self.timer = self.loop.call_at(due, self._timed_out)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        # The timeout counts from the last bytes received (like a socket read timeout); rather
        # than rescheduling the timer on every packet, it looks again when it fires.
        now = self.loop.time()
        self.timer = None
        if self.deadline is not None and now >= self.deadline:
            self.expired = True
            self._fail("timeout", f"did not finish its answer within {self.total:g} s")
            self.close()
            self.free()  # the slot goes back even if the consumer never reads again
            return
        if self.complete:
            if self.deadline is not None and self.slot is not None:
                self.timer = self.loop.call_at(self.deadline, self._timed_out)
            return
        quiet = now - self.last_activity
        if self.paused or self.sending:
            # We stopped reading (a slow consumer), or the request's body is still arriving
            # from the researcher: the backend is not to blame.
            quiet = 0.0
        if quiet < self.read_timeout:
            due = now + self.read_timeout - quiet
            if self.deadline is not None:
                due = min(due, self.deadline)
            self.timer = self.loop.call_at(due, self._timed_out)
            return
        self._fail("timeout", f"sent nothing for {self.read_timeout:g} s")
        self.close()


class Pool:
    """Keep-alive connections to one ``host:port``, at most ``size`` at once."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        size: int,
        connect_timeout: float,
        read_timeout: float,
        pool_timeout: float = 5.0,
        keepalive: float = 4.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.host, self.port = host, port
        self.tls = tls
        default_port = 443 if tls else 80
        self.host_header = host if port == default_port else f"{host}:{port}"
        self.size = size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.pool_timeout = pool_timeout
        self.keepalive = keepalive
        """Seconds an idle connection may be reused (below the backend's own keep-alive)."""
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(size)

    async def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def _acquire(self, deadline: float | None, total: float) -> None:
        """Take a slot, waiting at most ``pool_timeout`` (and never past ``deadline``)."""
        if not self._slots.locked():
            await self._slots.acquire()  # free: taken at once, no timer
            return
        loop = asyncio.get_running_loop()
        wait = self.pool_timeout
        if deadline is not None:
            wait = min(wait, deadline - loop.time())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                await self._slots.acquire()
        except TimeoutError:
            if wait < self.pool_timeout:
                raise UpstreamTimeout(
                    self.name, f"no connection was free within the {total:g} s limit", sent=False
                ) from None
            raise UpstreamBusy(
                self.name,
                f"all {self.size} connections stayed busy for {self.pool_timeout:g} s: not sent",
                sent=False,
            ) from None

    async def _connect(self, deadline: float | None = None, total: float = 0.0) -> _Connection:
        loop = asyncio.get_running_loop()
        wait = self.connect_timeout
        if deadline is not None:
            wait = min(wait, max(deadline - loop.time(), 0.0))
        try:
            async with asyncio.timeout(wait):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(
                self.name, "did not accept a connection in time", sent=False
            ) from None
        except ssl.SSLError as exc:  # a wrong CA, a wrong host name, a refused handshake
            raise UpstreamUnreachable(self.name, tls_failure(exc), sent=False) from None
        except OSError as exc:
            raise UpstreamUnreachable(
                self.name, f"cannot connect ({exc.strerror or type(exc).__name__})", sent=False
            ) from None
        conn.tls = self.tls is not None
        return conn

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            # Never one idle longer than the backend keeps it: a write sent on a connection the
            # backend is closing would be in doubt (the fixed 30 s window did that).
            if not conn.closed and now - conn.last_used < self.keepalive:
                conn.reused = True
                return conn
            conn.close()
        return None

    def serialize(self, method: str, target: str, headers: Headers, body: Body) -> bytes:
        if not _TOKEN.fullmatch(method) or any(c in target for c in " \r\n"):
            raise ValueError("the method or request target cannot be sent as is")
        parts = [f"{method} {target} HTTP/1.1\r\nHost: ", self.host_header, "\r\n"]
        for name, value in headers:
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise ValueError(f"header {name!r}: a line break cannot be sent")
            parts += (name, ": ", value, "\r\n")
        if isinstance(body, Streamed):
            parts += ("Content-Length: ", str(body.length), "\r\n")
        elif body or method in ("POST", "PUT", "PATCH"):
            parts += ("Content-Length: ", str(len(body)), "\r\n")
        parts.append("\r\n")
        return "".join(parts).encode("latin-1")

    async def send(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: Body,
        *,
        read_timeout: float | None = None,
        deadline: float | None = None,
        total: float = 0.0,
    ) -> tuple[_Connection, Response]:
        """Send a request; the caller must :meth:`release` the connection it returns.
        ``read_timeout``: this request's (the pool's by default); ``deadline``: the loop time
        by which the whole exchange ends (``total`` seconds after it began, for messages)."""
        head = self.serialize(method, target, headers, body)
        streamed = isinstance(body, Streamed)
        limits = (read_timeout or self.read_timeout, deadline, total)
        await self._acquire(deadline, total)
        try:
            # A streamed body cannot be sent twice: never on a kept-alive connection the
            # backend may have closed meanwhile (the one case a request is re-sent).
            conn = (None if streamed else self._take_idle()) or await self._connect(deadline, total)
        except BaseException:
            self._slots.release()
            raise
        conn.slot = self._slots  # from here on the connection gives it back, once
        try:
            return conn, await self._attempt(conn, method, head, body, *limits)
        except _Failure as failure:
            conn.close()
            # A kept-alive connection the backend had just closed: nothing was read, so
            # nothing was processed. Safe methods are tried once more on a fresh one. A
            # timeout is not that case: the backend may be working on it.
            stale = conn.reused and failure.kind == "broken" and not failure.got_bytes
            if stale and method in ("GET", "HEAD", "OPTIONS") and not streamed:
                try:
                    fresh = await self._connect(deadline, total)
                except BaseException:
                    conn.free()
                    raise
                fresh.slot, conn.slot = conn.slot, None
                try:
                    return fresh, await self._attempt(fresh, method, head, body, *limits)
                except _Failure as again:
                    fresh.close()
                    fresh.free()
                    raise self._error(again) from None
                except BaseException:
                    fresh.close()
                    fresh.free()
                    raise
            conn.free()
            raise self._error(failure) from None
        except BaseException:
            conn.close()  # cancelled: the answer will never be read
            conn.free()
            raise

    async def _attempt(
        self,
        conn: _Connection,
        method: str,
        head: bytes,
        body: Body,
        read_timeout: float,
        deadline: float | None,
        total: float,
    ) -> Response:
        return await conn.request(
            head,
            body,
            is_head=method == "HEAD",
            timeout=read_timeout,
            deadline=deadline,
            total=total,
        )

    def release(self, conn: _Connection) -> None:
        """Return a connection after its answer was read whole, or close it."""
        conn.free()
        if conn.reusable():
            conn.last_used = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def error(self, failure: Exception) -> Exception:
        return self._error(failure) if isinstance(failure, _Failure) else failure

    def _error(self, failure: _Failure) -> UpstreamTimeout | UpstreamUnreachable:
        if failure.kind == "timeout":
            return UpstreamTimeout(self.name, str(failure), sent=failure.sent)
        return UpstreamUnreachable(self.name, str(failure), sent=failure.sent)
