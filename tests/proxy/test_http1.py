"""The lean HTTP/1.1 client against real servers on loopback: aiohttp where any HTTP server
will do, hand-written bytes where the test needs control of every byte and of the socket."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import NamedTuple

import pytest
from aiohttp import web

from bascule.config import Backend
from bascule.errors import UpstreamTimeout, UpstreamUnreachable
from bascule.http1 import _HIGH_WATER, Headers
from bascule.tasks import spawn
from bascule.upstream import Upstream
from tests.harness import catch_all, closed_port_url, garbage_server, serve_app

BIG = random.Random(1).randbytes(6 * 1024 * 1024)
READ_SIZE = 256 * 1024  # the most asyncio hands a protocol in one data_received


@asynccontextmanager
async def upstream(
    url: str, *, read_timeout: float = 5.0, pool_size: int = 10
) -> AsyncIterator[Upstream]:
    backend = Backend(url=url, connect_timeout=1.0, read_timeout=read_timeout, pool_size=pool_size)
    up = Upstream("test", backend)
    await up.open()
    try:
        yield up
    finally:
        await up.close()


async def fetch(
    up: Upstream, path: str = "/", method: str = "GET", body: bytes = b"", headers: Headers = ()
) -> tuple[int, bytes]:
    async with asyncio.timeout(5):  # a hang fails the test instead of stalling it
        async with up.request(method, path, headers, body) as resp:
            return resp.status, await resp.read()


def names(headers: list[tuple[str, str]]) -> str:
    return " ".join(name for name, _ in headers)


def ok(body: bytes = b"ok", *extra: str) -> bytes:
    head = "".join(f"{line}\r\n" for line in (f"Content-Length: {len(body)}", *extra))
    return f"HTTP/1.1 200 OK\r\n{head}\r\n".encode() + body


# -- a server written byte by byte -----------------------------------------------------------


class Request(NamedTuple):
    method: str
    path: str
    head: bytes
    body: bytes


class Conn:
    """One accepted connection, as a hand-written handler sees it."""

    def __init__(self, raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.raw, self.reader, self.writer = raw, reader, writer
        self.n = raw.connections  # 1 for the first connection

    async def request(self) -> Request | None:
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        request = Request(method, path, head, await self.reader.readexactly(length))
        self.raw.requests.append(request)
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_hang_up(self) -> None:
        await self.reader.read()


Handler = Callable[[Conn], Awaitable[None]]


class RawServer:
    """A TCP server whose handler writes answers by hand; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.url = ""
        self.connections = 0
        self.requests: list[Request] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[object]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(Conn(self, reader, writer))
        except ConnectionError:
            pass  # the client hung up: what several tests want
        finally:
            writer.close()

    def count(self, method: str) -> int:
        return [r.method for r in self.requests].count(method)


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[RawServer]:
    raw = RawServer(handler)
    server = await asyncio.start_server(raw.serve, "127.0.0.1", 0)
    raw.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield raw
    finally:
        server.close()
        for writer in raw.writers:
            writer.close()  # ends the handlers waiting to read
        if raw.tasks:
            await asyncio.wait(raw.tasks, timeout=2)
        await server.wait_closed()
        await asyncio.sleep(0.05)  # the client sees the close of any connection it still holds


def answering(answer: Callable[[Request], bytes]) -> Handler:
    """Answers every request of a connection with ``answer(request)``; never closes first."""

    async def handle(conn: Conn) -> None:
        while (request := await conn.request()) is not None:
            await conn.send(answer(request))

    return handle


class Misbehaving:
    """Answers by path: /hang never, /stall and /cut break off a body, /garbage is not HTTP,
    /pair waits for a second /pair to arrive; anything else is answered."""

    def __init__(self) -> None:
        self.hanging = asyncio.Event()
        self.pairs: list[asyncio.Future[None]] = []

    async def __call__(self, conn: Conn) -> None:
        while (request := await conn.request()) is not None:
            if request.path == "/hang":
                self.hanging.set()
                return await conn.until_hang_up()
            if request.path in ("/stall", "/cut"):
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
                return await conn.until_hang_up() if request.path == "/stall" else None
            if request.path == "/garbage":
                await conn.send(b"SSH-2.0-OpenSSH\r\n\r\n")
                continue
            if request.path == "/pair":
                self.pairs.append(asyncio.get_running_loop().create_future())
                if len(self.pairs) == 2:
                    for pair in self.pairs:
                        pair.set_result(None)
                await self.pairs[-1]
            await conn.send(ok())


# -- keep-alive -------------------------------------------------------------------------------


def aiohttp_backend(transports: set[object]) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        transports.add(request.transport)
        if request.path == "/echo":
            return web.Response(body=await request.read())
        if request.path == "/stream":
            resp = web.StreamResponse()
            if request.query.get("chunked"):
                resp.enable_chunked_encoding()
            else:
                resp.content_length = len(BIG)
            await resp.prepare(request)
            for i in range(0, len(BIG), 100_000):
                await resp.write(BIG[i : i + 100_000])
            await resp.write_eof()
            return resp
        return web.Response(text="hello")

    return catch_all(handle)


async def test_sequential_requests_share_one_connection() -> None:
    transports: set[object] = set()
    async with serve_app(aiohttp_backend(transports)) as url, upstream(url) as up:
        for i in range(4):
            assert await fetch(up, "/") == (200, b"hello")
            body = f"body {i}".encode()
            assert await fetch(up, "/echo", "POST", body) == (200, body)
    assert len(transports) == 1


@pytest.mark.parametrize("case", ["connection-close", "head", "unread-body", "raised"])
async def test_an_answer_that_cannot_be_reused_is_not(case: str) -> None:
    def answer(request: Request) -> bytes:
        if request.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
        if request.path == "/close":
            return ok(b"ok", "Connection: close")  # ... yet this server keeps the socket open
        if request.path == "/big":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 500_000
        return ok()

    async with raw_server(answering(answer)) as srv, upstream(srv.url) as up:
        if case == "connection-close":
            assert await fetch(up, "/close") == (200, b"ok")
        elif case == "head":
            assert await fetch(up, "/", "HEAD") == (200, b"")
        elif case == "unread-body":
            async with up.request("GET", "/big", [], b"") as resp:
                assert resp.status == 200
        else:
            with pytest.raises(RuntimeError):
                async with up.request("GET", "/", [], b""):
                    raise RuntimeError("the caller failed")
        assert await fetch(up, "/") == (200, b"ok")
    assert srv.connections == 2


# -- bodies -----------------------------------------------------------------------------------


async def test_chunked_answer_is_read_whole_and_headers_kept_in_order() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nX-Z: 1\r\nTransfer-Encoding: chunked\r\nx-a: 2\r\nX-Z: 3\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    )
    async with raw_server(answering(lambda _: chunked)) as srv, upstream(srv.url) as up:
        for _ in range(2):
            async with up.request("GET", "/", [], b"") as resp:
                assert await resp.read() == b"hello world"
                assert resp.content_length is None
                assert names(resp.raw_headers) == "X-Z Transfer-Encoding x-a X-Z"
                assert resp.headers.getall("x-z") == ["1", "3"]
    assert srv.connections == 1  # the end of a chunked body was recognised


@pytest.mark.parametrize("status_line", ["HTTP/1.0 200 OK", "HTTP/1.1 200 OK\r\nConnection: close"])
async def test_a_body_that_ends_at_close_is_read_whole(status_line: str) -> None:
    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(f"{status_line}\r\nContent-Type: text/plain\r\n\r\nuntil".encode())
        await asyncio.sleep(0.05)
        await conn.send(b" the end")

    async with raw_server(handle) as srv, upstream(srv.url) as up:
        assert await fetch(up) == (200, b"until the end")
        assert await fetch(up) == (200, b"until the end")
    assert srv.connections == 2


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_large_body_streams_through_intact(chunked: bool) -> None:
    transports: set[object] = set()
    async with serve_app(aiohttp_backend(transports)) as url, upstream(url) as up:
        digest, size, pieces = hashlib.sha256(), 0, 0
        async with up.request(
            "GET", "/stream?chunked=1" if chunked else "/stream", [], b""
        ) as resp:
            assert resp.content_length == (None if chunked else len(BIG))
            async for chunk in resp.iter_chunks():
                digest.update(chunk)
                size, pieces = size + len(chunk), pieces + 1
        assert (size, digest.digest()) == (len(BIG), hashlib.sha256(BIG).digest())
        assert pieces > 1  # streamed, not gathered
        assert await fetch(up, "/") == (200, b"hello")
    assert len(transports) == 1


def firehose(size: int, written: list[int]) -> Handler:
    """Answers with ``size`` bytes as fast as the client takes them; counts what it wrote."""
    block = bytes(range(256)) * 256

    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        while written[0] < size:
            written[0] += len(block)
            await conn.send(block)

    return handle


async def test_a_slow_reader_holds_the_backend_back() -> None:
    size, written = 32 * 1024 * 1024, [0]
    async with raw_server(firehose(size, written)) as srv, upstream(srv.url) as up:
        async with up.request("GET", "/", [], b"") as resp:
            await asyncio.sleep(0.3)  # the consumer is busy elsewhere
            conn = resp._conn
            assert conn.paused
            assert conn.buffered <= _HIGH_WATER + READ_SIZE
            settled = written[0]
            await asyncio.sleep(0.2)
            assert written[0] == settled < size  # the backend waits instead of running ahead
            digest, got, most = hashlib.sha256(), 0, 0
            async for chunk in resp.iter_chunks():
                digest.update(chunk)
                got += len(chunk)
                most = max(most, conn.buffered)
    assert got == size and most <= _HIGH_WATER + READ_SIZE
    assert digest.digest() == hashlib.sha256(bytes(range(256)) * (size // 256)).digest()


async def test_a_slow_reader_is_not_taken_for_a_slow_backend() -> None:
    # While reading is paused for the consumer, the backend cannot send: that time is not its.
    size, written = 4 * 1024 * 1024, [0]
    async with raw_server(firehose(size, written)) as srv:
        async with upstream(srv.url, read_timeout=0.3) as up:
            async with asyncio.timeout(5), up.request("GET", "/", [], b"") as resp:
                await asyncio.sleep(1.0)
                body = await resp.read()
    assert len(body) == size


@pytest.mark.parametrize(
    ("method", "answer", "connections"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", 2),  # HEAD: never reused
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", 1),
        ("GET", b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n', 1),
    ],
)
async def test_answers_without_body_do_not_hang(
    method: str, answer: bytes, connections: int
) -> None:
    status = int(answer.split()[1])
    async with raw_server(answering(lambda _: answer)) as srv, upstream(srv.url) as up:
        for _ in range(2):  # and nothing of the next answer is taken for a body
            assert await fetch(up, "/", method) == (status, b"")
    assert srv.connections == connections


@pytest.mark.parametrize(
    "informational",
    [
        [b"HTTP/1.1 100 Continue\r\n\r\n"],
        [b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"],
        [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </b>\r\n\r\n"],
    ],
)
async def test_informational_answers_are_skipped(informational: list[bytes]) -> None:
    async def handle(conn: Conn) -> None:
        while await conn.request() is not None:
            for part in informational:
                await conn.send(part)
                await asyncio.sleep(0.02)  # separate packets: the final answer is not there yet
            await conn.send(ok(b"done", "X-Final: yes"))

    async with raw_server(handle) as srv, upstream(srv.url) as up:
        for _ in range(2):
            async with asyncio.timeout(2), up.request("POST", "/", [], b"{}") as resp:
                assert resp.status == 200
                assert await resp.read() == b"done"
                assert resp.content_length == 4
                assert names(resp.raw_headers) == "Content-Length X-Final"
    assert srv.connections == 1


# -- errors -----------------------------------------------------------------------------------


async def test_refused_connection_is_unreachable_and_not_sent() -> None:
    async with upstream(closed_port_url()) as up:
        with pytest.raises(UpstreamUnreachable) as caught:
            await fetch(up)
    assert caught.value.sent is False


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "kept-alive"])
async def test_silence_times_out_once_after_the_read_timeout(warm: bool) -> None:
    async with raw_server(Misbehaving()) as srv, upstream(srv.url, read_timeout=0.4) as up:
        if warm:
            assert await fetch(up) == (200, b"ok")
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout) as caught:
            await fetch(up, "/hang")
        elapsed = time.monotonic() - started
    assert caught.value.sent is True
    # A timeout is not the stale-connection race: the slow backend gets the request once.
    assert [r.path for r in srv.requests].count("/hang") == 1
    assert 0.35 < elapsed < 0.75


@pytest.mark.parametrize("how", ["stall", "cut"])
async def test_a_body_that_breaks_off_fails_the_read(how: str) -> None:
    error = UpstreamTimeout if how == "stall" else UpstreamUnreachable
    statuses, chunks = [], []
    async with raw_server(Misbehaving()) as srv, upstream(srv.url, read_timeout=0.3) as up:
        with pytest.raises(error) as caught:
            async with asyncio.timeout(3), up.request("GET", f"/{how}", [], b"") as resp:
                statuses.append(resp.status)
                async for chunk in resp.iter_chunks():
                    chunks.append(chunk)
    assert statuses == [200] and b"".join(chunks) == b"x" * 10  # it failed while reading
    assert caught.value.sent is True


async def test_garbage_is_unreachable_not_http() -> None:
    async with garbage_server() as url, upstream(url) as up:
        with pytest.raises(UpstreamUnreachable, match="not HTTP") as caught:
            await fetch(up)
    assert caught.value.sent is True


# -- a kept-alive connection the backend closes -----------------------------------------------


async def closes_on_second_request(conn: Conn) -> None:
    """The first connection answers once, then takes the next request and hangs up (the race
    of a backend closing an idle connection as the client reuses it); later ones answer."""
    if conn.n > 1:
        return await answering(lambda _: ok())(conn)
    await conn.request()
    await conn.send(ok())
    await conn.request()


async def test_a_get_on_a_connection_closed_under_it_is_retried_once() -> None:
    async with raw_server(closes_on_second_request) as srv, upstream(srv.url) as up:
        assert await fetch(up, "/a") == (200, b"ok")
        assert await fetch(up, "/b") == (200, b"ok")
    assert [r.path for r in srv.requests] == ["/a", "/b", "/b"]
    assert srv.connections == 2


async def test_a_post_on_a_connection_closed_under_it_is_never_sent_twice() -> None:
    async with raw_server(closes_on_second_request) as srv, upstream(srv.url) as up:
        assert await fetch(up, "/a") == (200, b"ok")
        with pytest.raises(UpstreamUnreachable) as caught:
            await fetch(up, "/b", "POST", b"{}")
        await asyncio.sleep(0.1)  # time for a wrongful second attempt to arrive
    assert caught.value.sent is True  # in doubt: the backend read it
    assert srv.count("POST") == 1 and srv.connections == 1


async def test_a_close_noticed_before_reuse_costs_nothing() -> None:
    async def handle(conn: Conn) -> None:
        await conn.request()
        await conn.send(ok())  # keep-alive by default, and then closed at once

    async with raw_server(handle) as srv, upstream(srv.url) as up:
        assert await fetch(up, "/a") == (200, b"ok")
        assert up._pool is not None
        async with asyncio.timeout(2):  # until the client has seen the backend's close
            while not all(conn.closed for conn in up._pool._idle):
                await asyncio.sleep(0.01)
        assert await fetch(up, "/b", "POST", b"{}") == (200, b"ok")
    assert srv.count("POST") == 1 and srv.connections == 2


# -- the pool ---------------------------------------------------------------------------------


async def test_failures_and_cancellations_leak_no_pool_slot() -> None:
    server = Misbehaving()
    async with raw_server(server) as srv, upstream(srv.url, read_timeout=0.2, pool_size=2) as up:
        for _ in range(3):
            with pytest.raises(UpstreamTimeout):
                await fetch(up, "/hang")
            with pytest.raises(UpstreamUnreachable, match="not HTTP"):
                await fetch(up, "/garbage")
            with pytest.raises(UpstreamUnreachable):
                await fetch(up, "/cut")
            with pytest.raises(ValueError):
                await fetch(up, "/", headers=[("X-Bad", "a\r\nb")])
            with pytest.raises(RuntimeError):
                async with up.request("GET", "/", [], b""):
                    raise RuntimeError("the caller failed")
            with pytest.raises(UpstreamTimeout):
                await fetch(up, "/stall")
            async with up.request("GET", "/stall", [], b""):
                pass  # left with its body unread
            server.hanging.clear()
            task = spawn(fetch(up, "/hang"), name="request cancelled mid-flight")
            async with asyncio.timeout(2):
                await server.hanging.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        async with asyncio.timeout(2):  # both slots are free again, at the same time
            both = await asyncio.gather(fetch(up, "/pair"), fetch(up, "/pair"))
        assert list(both) == [(200, b"ok")] * 2


async def test_a_cancelled_request_closes_its_connection() -> None:
    received, hung_up = asyncio.Event(), asyncio.Event()

    async def handle(conn: Conn) -> None:
        await conn.request()
        received.set()
        await conn.until_hang_up()
        hung_up.set()

    async with raw_server(handle) as srv, upstream(srv.url, read_timeout=10) as up:
        task = spawn(fetch(up), name="request cancelled mid-flight")
        async with asyncio.timeout(2):
            await received.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Not after the read timeout: the backend stops working for nobody at once.
        async with asyncio.timeout(1):
            await hung_up.wait()


# -- what goes on the wire --------------------------------------------------------------------


async def test_the_request_goes_out_as_given() -> None:
    large = random.Random(2).randbytes(200_000)
    async with raw_server(answering(lambda _: ok())) as srv, upstream(srv.url + "/base/") as up:
        headers = [("X-B", "2"), ("x-a", "1"), ("X-B", "3")]
        assert await fetch(up, "/v1/x?b=2&a=%2F", headers=headers) == (200, b"ok")
        json = [("Content-Type", "application/json")]
        assert await fetch(up, "/q", "POST", b'{"a": 1}', json) == (200, b"ok")
        assert await fetch(up, "/e", "POST") == (200, b"ok")
        assert await fetch(up, "/big", "PUT", large) == (200, b"ok")
    host = srv.url.removeprefix("http://")
    first, post, empty, put = srv.requests
    start = f"GET /base/v1/x?b=2&a=%2F HTTP/1.1\r\nHost: {host}"
    assert first.head == f"{start}\r\nX-B: 2\r\nx-a: 1\r\nX-B: 3\r\n\r\n".encode()
    start = f"POST /base/q HTTP/1.1\r\nHost: {host}"
    json_length = "Content-Type: application/json\r\nContent-Length: 8"
    assert (post.head, post.body) == (f"{start}\r\n{json_length}\r\n\r\n".encode(), b'{"a": 1}')
    assert empty.head.endswith(b"\r\nContent-Length: 0\r\n\r\n") and empty.body == b""
    assert put.head.endswith(b"\r\nContent-Length: 200000\r\n\r\n") and put.body == large
    assert srv.connections == 1


@pytest.mark.parametrize(
    "header",
    [("X-A", "1\r\nX-Injected: 1"), ("X-A", "1\nX-Injected: 1"), ("X-A", "1\r"), ("X-A\r\nX", "1")],
)
async def test_a_line_break_in_a_header_is_refused_before_sending(header: tuple[str, str]) -> None:
    async with raw_server(answering(lambda _: ok())) as srv, upstream(srv.url) as up:
        with pytest.raises(ValueError, match="line break"):
            await fetch(up, headers=[("X-Fine", "yes"), header])
        await asyncio.sleep(0.05)
    assert srv.connections == 0 and srv.requests == []
