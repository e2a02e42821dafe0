"""The researcher-facing HTTP/1.1 server: llhttp parsing (httptools), one handler per request.

This is the hot path: every researcher request crosses it. aiohttp's server, even its
low-level one, spent 2-3 times the CPU per request of this one (``bench/proxy_overhead.py``);
the admin API, which is not on the hot path, stays on aiohttp.

What it does: keep-alive and pipelined requests answered in order, ``Expect: 100-continue``,
chunked request bodies, limits on the request line, the headers and the body (414, 431, 413),
a deadline to receive a whole request (408, against slow clients), an idle keep-alive timeout,
and answers whole or streamed with flow control. A protocol upgrade is not honoured: the
request is answered as plain HTTP and the connection closed after. Anything llhttp cannot
parse gets 400. A handler is never cancelled because its client went away: a write that has
begun is finished and journaled.

Memory per connection is bounded (``bench/requests_memory.py``):

- a handler starts once a request's headers are in, and reads its body as it arrives
  (:meth:`Request.read` whole, or :meth:`Request.stream`): reading from the socket stops while
  ``BODY_HIGH_WATER`` bytes of it wait for the handler;
- ``100 Continue`` is sent when the handler first asks for the body, never for a request it
  refuses first (its answer then closes the connection: the body was never read);
- answers wait for the client: the next pipelined request is not served, nor read, while the
  transport holds more than its high-water mark of answers the client has not taken; and at
  most ``_MAX_PIPELINED`` requests (plus one ``FEED_SLICE`` of bytes parsed) wait their turn;
- the connection and its parser reference each other; the cycle is broken when the
  connection closes, so its memory (the last body it received among it) is freed at once
  rather than by the cyclic garbage collector.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from http import HTTPStatus

import httptools
import orjson

from bascule.tasks import spawn

log = logging.getLogger("bascule.proxy.server")

Headers = Sequence[tuple[str, str]]

MAX_TARGET = 8 * 1024
MAX_HEADER_BYTES = 64 * 1024
REQUEST_DEADLINE = 60.0  # seconds to receive a whole request once it has begun
KEEPALIVE_IDLE = 75.0  # seconds a kept-alive connection may wait for its next request
BODY_HIGH_WATER = 256 * 1024
"""Bytes of a request body buffered for its handler before reading from the socket stops."""
FEED_SLICE = 8 * 1024
"""Bytes handed to the parser at once outside a body of known length: between slices it
checks whether to stop, so a client pipelining ahead has at most one slice of requests
parsed past ``_MAX_PIPELINED`` (a socket read can hold thousands of small requests)."""
_NO_BODY_STATUS = frozenset({204, 304})
_MAX_PIPELINED = 8  # requests read ahead of the one being answered, per connection
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LINGER = 5.0  # seconds a refused request's unread body is read and dropped before closing


class BodyError(Exception):
    """A request body that will not arrive whole: over the limit (413), too slow (408), badly
    framed (400), or its client went away (``status`` 0: nobody to answer)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code = status, code
        super().__init__(message)


class Body:
    """A request's body as it arrives, for one reader."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_waiter",
        "buffered",
        "complete",
        "expect_continue",
        "failure",
        "length",
        "received",
    )

    def __init__(
        self, conn: _Connection | None, length: int | None, *, expect_continue: bool = False
    ) -> None:
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.length = length
        """``Content-Length`` (None: chunked, or no body)."""
        self.buffered = 0
        self.received = 0
        self.complete = False
        self.expect_continue = expect_continue
        self.failure: BodyError | None = None

    @classmethod
    def whole(cls, data: bytes) -> Body:
        """A body that has arrived already (tests, tools)."""
        body = cls(None, len(data))
        if data:
            body.feed(data)
        body.finish()
        return body

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self.buffered += len(data)
        self.received += len(data)
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, failure: BodyError) -> None:
        if not self.complete and self.failure is None:
            self.failure = failure
            self._wake()

    def detach(self) -> None:
        self._conn = None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive, each time all that has arrived. Raises
        :class:`BodyError` if it will not arrive whole."""
        conn = self._conn
        if self.expect_continue:
            self.expect_continue = False
            if conn is not None and not self.received and not self.complete:
                conn.write(_CONTINUE)
        while True:
            if self._chunks:
                chunk = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self.buffered = 0
                if conn is not None:
                    conn.flow()
                yield chunk
                continue
            if self.complete:
                return
            if self.failure is not None:
                raise self.failure
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


_NO_BODY = Body.whole(b"")


class Request:
    """One researcher request: its head at once, its body as it arrives."""

    __slots__ = (
        "_body",
        "_whole",
        "headers",
        "host",
        "http10",
        "keep_alive",
        "method",
        "remote",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        *,
        remote: str = "",
        host: str = "",
        keep_alive: bool = True,
        http10: bool = False,
        body: Body | bytes = b"",
    ) -> None:
        self.method = method
        self.target = target
        """The request-target exactly as received: raw path and query string."""
        self.headers = headers
        """As received, in order, names as the client spelled them (trailers never)."""
        self.remote = remote
        self.host = host
        self.keep_alive = keep_alive
        self.http10 = http10
        self._body = body if isinstance(body, Body) else Body.whole(body)
        self._whole: bytes | None = None

    def header(self, name: str) -> str | None:
        lower = name.lower()
        for key, value in self.headers:
            if key.lower() == lower:
                return value
        return None

    @property
    def length(self) -> int | None:
        """The body's announced length (``Content-Length``); None when chunked or absent."""
        return self._body.length

    @property
    def complete(self) -> bool:
        """The whole body has arrived."""
        return self._body.complete

    async def read(self) -> bytes:
        """The whole body (at most the server's ``max_body_bytes``), once it has arrived."""
        if self._whole is None:
            if self._body.complete and not self._body.buffered:
                self._whole = b""
            else:
                parts = [chunk async for chunk in self._body.chunks()]
                self._whole = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._whole

    def stream(self) -> AsyncIterator[bytes]:
        """The body as it arrives, never held whole: read once, or :meth:`read` it."""
        return self._body.chunks()


class Responder:
    """Writes one answer: :meth:`send` a whole one, or :meth:`start`, :meth:`write`, :meth:`end`."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_head_only",
        "_http10",
        "_keep_alive",
        "_request",
        "aborted",
        "finished",
        "started",
        "status",
    )

    def __init__(
        self,
        conn: _Connection,
        *,
        head_only: bool,
        keep_alive: bool,
        http10: bool = False,
        request: Request | None = None,
    ) -> None:
        self._conn = conn
        self._head_only = head_only
        self._keep_alive = keep_alive
        self._http10 = http10
        self._request = request
        self._chunked = False
        self.started = False
        self.finished = False
        self.status = 0
        self.aborted = False
        """The answer's status once its head is made (0: none yet)."""

    def _head(self, status: int, headers: Headers, length: int | None, *, framed: bool) -> bytes:
        self.status = status
        request = self._request
        if request is not None and not (request.keep_alive and request.complete):
            # Upgraded since, or answered before its body arrived (a refusal): what follows on
            # the connection cannot be read as the next request.
            self._keep_alive = False
        parts = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
        for name, value in headers:
            if "\n" in value or "\r" in value:
                raise ValueError(f"header {name!r}: a line break cannot be sent")
            parts += (name, ": ", value, "\r\n")
        if framed:
            if length is None and self._http10:
                # HTTP/1.0 knows no chunking: the body ends when the connection closes.
                self._keep_alive = False
            elif length is None:
                self._chunked = True
                parts.append("Transfer-Encoding: chunked\r\n")
            else:
                parts += ("Content-Length: ", str(length), "\r\n")
        if self._conn.server.draining:
            # Stopping (SIGTERM): the client's next request goes to a new connection, which
            # the load balancer sends to another replica.
            self._keep_alive = False
        if not self._keep_alive:
            parts.append("Connection: close\r\n")
        parts.append("\r\n")
        return "".join(parts).encode("latin-1")

    async def send(
        self, status: int, headers: Headers, body: bytes, *, keep_length: bool = False
    ) -> None:
        """The whole answer at once. ``keep_length``: ``headers`` already carry the length
        (an answer to HEAD, or a 304, passed through as the backend gave it)."""
        framed = status not in _NO_BODY_STATUS and not keep_length
        head = self._head(status, headers, len(body), framed=framed)
        self.started = True
        send_body = body and not self._head_only and status not in _NO_BODY_STATUS
        self._conn.write(head + body if send_body else head)
        self._finish()

    async def start(self, status: int, headers: Headers, length: int | None) -> None:
        self.started = True
        self._conn.write(self._head(status, headers, length, framed=True))

    async def write(self, chunk: bytes) -> None:
        if not chunk or self._head_only:
            return
        if self._chunked:
            self._conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self._conn.write(chunk)
        await self._conn.drain()

    async def end(self) -> None:
        if self._chunked and not self._head_only:
            self._conn.write(b"0\r\n\r\n")
        self._finish()

    def abort(self) -> None:
        """End a started answer short: the connection closes, so the client sees it cut
        (short of its length, or without the last chunk), never a complete wrong answer."""
        self.aborted = True
        self._conn.close()

    @property
    def keep_alive(self) -> bool:
        """Whether the answer lets the connection carry another request (else the server
        closes it once the handler returns)."""
        return self._keep_alive

    def _finish(self) -> None:
        self.finished = True


Handler = Callable[[Request, Responder], Awaitable[None]]


class _Failure(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code = status, code
        super().__init__(message)


class _Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.remote = ""
        self.closed = False
        self.queue: collections.deque[Request] = collections.deque()
        self.parsing: Request | None = None
        """The request whose body is arriving."""
        self.handling = False
        self.reading = True
        self.upgraded = False
        self.broken = False
        """The parser failed: nothing more is read on this connection."""
        self.pending = b""
        """Bytes read but not parsed yet, kept while parsing is stopped."""
        self.feeding = False
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = float("inf")
        self._begin()

    def _begin(self) -> None:
        self.target = bytearray()
        self.headers: list[tuple[str, str]] = []
        self.header_bytes = 0
        self.in_message = False
        self.headers_done = False

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple) else ""
        self.server.connections.add(self)
        self._arm(self.server.keepalive_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.can_write.set()
        self._stop_timer()
        self.server.connections.discard(self)
        if self.parsing is not None:
            self.parsing._body.fail(
                BodyError(0, "client_gone", "the client closed the connection mid-body")
            )
        # Break the connection <-> parser <-> request cycles now, so this connection and the
        # bodies it holds are freed when its last handler ends, not by the cyclic collector.
        for request in (*self.queue, self.parsing):
            if request is not None:
                request._body.detach()
        self.queue.clear()
        self.parsing = None
        self.parser = None
        self.transport = None
        self.pending = b""

    def pause_writing(self) -> None:
        self.can_write.clear()
        self.flow()

    def resume_writing(self) -> None:
        self.can_write.set()
        self.flow()

    def data_received(self, data: bytes) -> None:
        if self.pending:
            data, self.pending = self.pending + data, b""
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        if self.parser is None or self.broken or self.upgraded:
            return
        try:
            if len(data) <= FEED_SLICE and not self._stopped():
                self.parser.feed_data(data)
            else:
                self._feed_slices(self.parser, data)
        except httptools.HttpParserUpgrade:
            # An upgrade is not honoured: the request is answered as plain HTTP (Upgrade is
            # hop-by-hop, so the backend never sees it) and the connection closed after, since
            # whatever follows on it may not be HTTP.
            self.upgraded = True
            for request in self.queue:
                request.keep_alive = False
            self.flow()
        except httptools.HttpParserError as exc:
            # A limit hit in a callback arrives wrapped in HttpParserCallbackError.
            failure = exc.__context__
            if isinstance(failure, _Failure):
                self._refuse(failure.status, failure.code, str(failure))
            else:
                self._refuse(400, "bad_request", "the request is not valid HTTP/1.1")

    def _feed_slices(self, parser: httptools.HttpRequestParser, data: bytes) -> None:
        view = memoryview(data)
        at = 0
        while at < len(data):
            if self._stopped():
                self.pending = bytes(view[at:])
                self.flow()
                return
            step = FEED_SLICE
            parsing = self.parsing
            if parsing is not None and parsing._body.length is not None:
                # Inside a body of known length: all of it at once (no request can hide in it).
                step = max(step, parsing._body.length - parsing._body.received)
            parser.feed_data(view[at : at + step])
            at += step

    # -- flow control ------------------------------------------------------------------------

    def _stopped(self) -> bool:
        """Whether to stop parsing and reading: the client is not taking its answers, enough
        requests wait their turn, or a body waits for its handler."""
        parsing = self.parsing
        return (
            self.closed
            or self.broken
            or self.upgraded
            or not self.can_write.is_set()
            or len(self.queue) >= _MAX_PIPELINED
            or (parsing is not None and parsing._body.buffered > BODY_HIGH_WATER)
        )

    def flow(self) -> None:
        """Read from the socket only while there is room (see :meth:`_stopped`)."""
        transport = self.transport
        if transport is None or self.closed:
            return
        if self._stopped():
            if self.reading:
                self.reading = False
                transport.pause_reading()
        elif not self.reading:
            self.reading = True
            transport.resume_reading()
            if self.pending and not self.feeding:
                self.feeding = True
                self.loop.call_soon(self._feed_pending)

    def _feed_pending(self) -> None:
        self.feeding = False
        if self.pending and not self._stopped():
            data, self.pending = self.pending, b""
            self._feed(data)

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._begin()
        self.in_message = True
        self._arm(self.server.request_deadline)

    def on_url(self, url: bytes) -> None:
        self.target += url
        if len(self.target) > MAX_TARGET:
            raise _Failure(414, "uri_too_long", f"the request target is over {MAX_TARGET} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_done:
            return  # a trailer of a chunked body: never promoted to a header
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _Failure(431, "headers_too_large", f"headers are over {MAX_HEADER_BYTES} bytes")
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        parser = self.parser
        assert parser is not None
        limit = self.server.max_body_bytes
        hosts = 0
        length: int | None = None
        expect = False
        host = ""
        framed = False
        for name, value in self.headers:
            lower = name.lower()
            if lower == "host":
                hosts += 1
                host = value
                if hosts > 1:
                    raise _Failure(400, "bad_request", "the request has more than one Host header")
            elif lower == "content-length" and value.strip().isdigit():
                # llhttp refused a malformed, repeated or overflowing one already.
                digits = value.strip().lstrip("0")
                if len(digits) > 18 or int(digits or "0") > limit:
                    raise _Failure(413, "body_too_large", _too_large(limit))
                length = int(digits or "0")
            elif lower == "transfer-encoding":
                framed = True
            elif lower == "expect" and value.lower() == "100-continue":
                expect = True
        http10 = parser.get_http_version() == "1.0"
        if framed or length:
            body = Body(self, length, expect_continue=expect and not http10)
        else:
            body = _NO_BODY  # none follows (RFC 9112 6.3): one shared, complete, empty body
        request = Request(
            parser.get_method().decode("ascii"),
            self.target.decode("latin-1"),
            self.headers,
            remote=self.remote,
            host=host,
            keep_alive=parser.should_keep_alive() and not self._upgrade_asked(),
            http10=http10,
            body=body,
        )
        self.parsing = request
        self.queue.append(request)
        if not self.handling:
            self.handling = True
            spawn(self._serve_queue(), name="proxy-request")

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        assert request is not None
        if request._body.received + len(body) > self.server.max_body_bytes:
            raise _Failure(413, "body_too_large", _too_large(self.server.max_body_bytes))
        request._body.feed(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        if self.parsing is not None:
            self.parsing._body.finish()
            self.parsing = None
        self._disarm()

    def _upgrade_asked(self) -> bool:
        return any(k.lower() == "upgrade" for k, _ in self.headers)

    # -- serving -----------------------------------------------------------------------------

    async def _serve_queue(self) -> None:
        try:
            while self.queue and not self.closed:
                request = self.queue.popleft()
                if not self.reading:
                    self.flow()  # room for one more
                out = Responder(
                    self,
                    head_only=request.method == "HEAD",
                    keep_alive=request.keep_alive,
                    http10=request.http10,
                    request=request,
                )
                try:
                    failure = request._body.failure
                    if failure is not None:
                        raise failure  # it will never arrive whole: say so, handler or not
                    await self.server.handler(request, out)
                except BodyError as exc:
                    if exc.status and not out.started:
                        dataset = self.server.dataset_of(request.method, request.target)
                        await out.send(*_error_parts(exc.status, exc.code, str(exc), dataset))
                    self.close()
                except Exception as exc:  # a bug must not take the connection's others down
                    log.error("handler failed: %s", type(exc).__name__, exc_info=exc)
                    if not out.started:
                        await out.send(*_error_parts(500, "internal_error", "bascule failed"))
                    else:
                        self.close()
                if not out.finished:
                    self.close()
                    break
                if not request.complete:
                    await self._linger(request)
                if not out.keep_alive:
                    self.close()
                    break
                if not self.can_write.is_set():
                    await self._taken()
        finally:
            self.handling = False
        if not self.closed and self.transport is not None:
            if not self.in_message:
                self._arm(self.server.keepalive_idle)
            self.flow()

    async def _linger(self, request: Request) -> None:
        """Read and drop the rest of a body its handler did not read (a refusal), for up to
        ``_LINGER`` seconds, before the connection closes: closing on unread bytes resets it,
        and a client still sending could lose its answer. Not when the client waits for a
        ``100 Continue`` it was never sent: it sends nothing."""
        body = request._body
        if body.expect_continue or body.failure is not None:
            return
        try:
            async with asyncio.timeout(_LINGER):
                async for _ in body.chunks():
                    pass
        except (BodyError, TimeoutError):
            pass

    async def _taken(self) -> None:
        """Wait until the client has taken what it was sent, down to the transport's
        high-water mark, before the next pipelined request is answered (and read): a client
        that never reads holds one connection's buffers, never more. One that takes nothing
        for ``keepalive_idle`` seconds is closed."""
        try:
            async with asyncio.timeout(self.server.keepalive_idle):
                await self.can_write.wait()
        except TimeoutError:
            self.close()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if not self.can_write.is_set():
            await self.can_write.wait()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._stop_timer()
            if self.transport is not None:
                self.transport.close()

    def _refuse(self, status: int, code: str, message: str) -> None:
        self.broken = True
        parsing = self.parsing
        if parsing is not None:
            # Its head is in and its handler may be reading it: the handler (or the serving
            # loop, when its turn comes) answers, then the connection closes.
            parsing._body.fail(BodyError(status, code, message))
            self.flow()
            return
        if not self.handling:
            dataset = None
            if self.target and status in (408, 413) and self.parser is not None:
                try:
                    method = self.parser.get_method().decode("ascii")
                    dataset = self.server.dataset_of(method, self.target.decode("latin-1"))
                except Exception:
                    dataset = None
            status_line, headers, body = _error_parts(status, code, message, dataset)
            head = Responder(self, head_only=False, keep_alive=False)
            self.write(head._head(status_line, headers, len(body), framed=True) + body)
        self.close()

    def _arm(self, seconds: float) -> None:
        # Moving a deadline later is an assignment; the one timer checks it when it fires, so
        # the hot path creates no timer handle per request. Moved earlier (a request begun on
        # an idle connection: the receive deadline is shorter than the idle one), the timer is
        # moved too: waiting for the idle one let a request trickle in for 75 s, not 60.
        self.deadline = self.loop.time() + seconds
        if self.timer is not None and self.deadline < self.timer.when():
            self.timer.cancel()
            self.timer = None
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadline, self._expired)

    def _disarm(self) -> None:
        self.deadline = float("inf")

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        if self.closed:
            return
        now = self.loop.time()
        if self.deadline > now:
            if self.deadline != float("inf"):
                self.timer = self.loop.call_at(self.deadline, self._expired)
            return
        if self.in_message:
            self._refuse(408, "request_timeout", "the request did not arrive in time")
        elif not self.handling:
            self.close()  # idle keep-alive connection


def _too_large(limit: int) -> str:
    return f"the request body is larger than the {limit}-byte limit"


def _error_parts(
    status: int, code: str, message: str, dataset: str | None = None
) -> tuple[int, Headers, bytes]:
    error: dict[str, str] = {"code": code, "message": message}
    if dataset is not None:
        error["dataset"] = dataset
    body = orjson.dumps({"error": error})
    return status, [("Content-Type", "application/json"), ("X-Bascule-Error", code)], body


class Server:
    """Serves ``handler`` on ``host:port`` until :meth:`close`."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int,
        dataset_of: Callable[[str, str], str | None] = lambda method, target: None,
        request_deadline: float = REQUEST_DEADLINE,
        keepalive_idle: float = KEEPALIVE_IDLE,
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.request_deadline = request_deadline
        self.keepalive_idle = keepalive_idle
        self.dataset_of = dataset_of
        """Names the dataset of a refused request (method, target), for its error body."""
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self.draining = False
        """Set when the replica is stopping: every answer closes its connection after it."""

    async def start(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> int:
        """Listen; ``tls``: serve https (``[proxy.tls]``); ``reuse_port``: share the port with
        the replica's other workers (``SO_REUSEPORT``: the kernel spreads new connections over
        them)."""
        self._server = await self.loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            backlog=1024,
            reuse_address=True,
            ssl=tls,
            reuse_port=reuse_port or None,
        )
        sock = self._server.sockets[0]
        bound: int = sock.getsockname()[1]
        return bound

    async def close(self, grace: float = 10.0) -> int:
        """Stop accepting; let requests being served finish (up to ``grace`` s); close all.
        Returns how many connections were still serving a request when ``grace`` ran out."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if not conn.handling:
                conn.close()
        deadline = self.loop.time() + grace
        while any(c.handling for c in self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        cut = sum(1 for c in self.connections if c.handling)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
        return cut
