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
"""

from __future__ import annotations

import asyncio
import collections
import logging
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
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
_NO_BODY_STATUS = frozenset({204, 304})
_MAX_PIPELINED = 8  # requests read ahead of the one being answered, per connection
_REASONS = {s.value: s.phrase for s in HTTPStatus}


@dataclass(slots=True)
class Request:
    method: str
    target: str
    """The request-target exactly as received: raw path and query string."""
    headers: list[tuple[str, str]]
    """As received, in order, names as the client spelled them."""
    body: bytes
    remote: str
    host: str
    keep_alive: bool
    http10: bool = False

    def header(self, name: str) -> str | None:
        lower = name.lower()
        for key, value in self.headers:
            if key.lower() == lower:
                return value
        return None


class Responder:
    """Writes one answer: :meth:`send` a whole one, or :meth:`start`, :meth:`write`, :meth:`end`."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_head_only",
        "_http10",
        "_keep_alive",
        "finished",
        "started",
    )

    def __init__(
        self, conn: _Connection, *, head_only: bool, keep_alive: bool, http10: bool = False
    ) -> None:
        self._conn = conn
        self._head_only = head_only
        self._keep_alive = keep_alive
        self._http10 = http10
        self._chunked = False
        self.started = False
        self.finished = False

    def _head(self, status: int, headers: Headers, length: int | None, *, framed: bool) -> bytes:
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

    def _finish(self) -> None:
        self.finished = True
        if not self._keep_alive:
            self._conn.close()


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
        self.parser = httptools.HttpRequestParser(self)
        self.remote = ""
        self.closed = False
        self.queue: collections.deque[Request] = collections.deque()
        self.handling = False
        self.paused = False
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = float("inf")
        self._begin()

    def _begin(self) -> None:
        self.target = bytearray()
        self.headers: list[tuple[str, str]] = []
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_size = 0
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

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An upgrade is not honoured: the request is answered as plain HTTP (Upgrade is
            # hop-by-hop, so the backend never sees it) and the connection closed after, since
            # whatever follows on it may not be HTTP.
            for request in self.queue:
                request.keep_alive = False
            if self.transport is not None:
                self.transport.pause_reading()
        except httptools.HttpParserError as exc:
            # A limit hit in a callback arrives wrapped in HttpParserCallbackError.
            failure = exc.__context__
            if isinstance(failure, _Failure):
                self._refuse(failure.status, failure.code, str(failure))
            else:
                self._refuse(400, "bad_request", "the request is not valid HTTP/1.1")

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
        limit = self.server.max_body_bytes
        hosts = 0
        for name, value in self.headers:
            lower = name.lower()
            if lower == "host":
                hosts += 1
                if hosts > 1:
                    raise _Failure(400, "bad_request", "the request has more than one Host header")
            if lower == "content-length" and value.isdigit() and int(value) > limit:
                raise _Failure(413, "body_too_large", _too_large(limit))
            if lower == "expect" and value.lower() == "100-continue":
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.server.max_body_bytes:
            raise _Failure(413, "body_too_large", _too_large(self.server.max_body_bytes))
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        host = next((v for k, v in self.headers if k.lower() == "host"), "")
        self.queue.append(
            Request(
                method=self.parser.get_method().decode("ascii"),
                target=self.target.decode("latin-1"),
                headers=self.headers,
                body=b"".join(self.body) if len(self.body) != 1 else self.body[0],
                remote=self.remote,
                host=host,
                keep_alive=self.parser.should_keep_alive() and not self._upgrade_asked(),
                http10=self.parser.get_http_version() == "1.0",
            )
        )
        self._disarm()
        if len(self.queue) >= _MAX_PIPELINED and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()  # a client pipelining ahead waits; memory is bounded
        if not self.handling:
            self.handling = True
            spawn(self._serve_queue(), name="proxy-request")

    def _upgrade_asked(self) -> bool:
        return any(k.lower() == "upgrade" for k, _ in self.headers)

    # -- serving -----------------------------------------------------------------------------

    async def _serve_queue(self) -> None:
        try:
            while self.queue and not self.closed:
                request = self.queue.popleft()
                head_only = request.method == "HEAD"
                out = Responder(
                    self, head_only=head_only, keep_alive=request.keep_alive, http10=request.http10
                )
                try:
                    await self.server.handler(request, out)
                except Exception as exc:  # a bug must not take the connection's others down
                    log.error("handler failed: %s", type(exc).__name__, exc_info=exc)
                    if not out.started:
                        await out.send(*_error_parts(500, "internal_error", "bascule failed"))
                    else:
                        self.close()
                if not out.finished:
                    self.close()
        finally:
            self.handling = False
        if not self.closed and self.transport is not None:
            self._arm(self.server.keepalive_idle)
            if self.paused:
                self.paused = False
                self.transport.resume_reading()

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
        if not self.handling:
            dataset = None
            if self.target and status in (408, 413):
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

    async def start(self, host: str, port: int) -> int:
        self._server = await self.loop.create_server(
            lambda: _Connection(self), host, port, backlog=1024, reuse_address=True
        )
        sock = self._server.sockets[0]
        bound: int = sock.getsockname()[1]
        return bound

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting; let requests being served finish (up to ``grace`` s); close all."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if not conn.handling:
                conn.close()
        deadline = self.loop.time() + grace
        while any(c.handling for c in self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
