"""The researcher-facing HTTP/1.1 server, byte by byte over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from proxy.server import Request, Responder, Server


class Recorder:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.finished: list[str] = []

    async def handle(self, request: Request, out: Responder) -> None:
        self.requests.append(request)
        if request.target == "/slow":
            await asyncio.sleep(0.3)
            self.finished.append(request.target)
        if request.target == "/boom":
            raise RuntimeError("a bug")
        if request.target == "/stream":
            await out.start(200, [("Content-Type", "text/plain")], None)
            for i in range(5):
                await out.write(str(i).encode() * 10_000)
            await out.end()
            return
        if request.method == "HEAD":
            await out.send(200, [("Content-Length", "1234")], b"", keep_length=True)
            return
        body = orjson.dumps({"target": request.target, "body": (await request.read()).decode()})
        await out.send(200, [("Content-Type", "application/json")], body)


@pytest.fixture
async def server() -> AsyncIterator[tuple[Recorder, int]]:
    rec = Recorder()
    srv = Server(
        rec.handle,
        max_body_bytes=1000,
        dataset_of=lambda method, target: "dcir" if target.startswith("/v1") else None,
        request_deadline=0.5,
        keepalive_idle=0.5,
    )
    port = await srv.start("127.0.0.1", 0)
    yield rec, port
    await srv.close(grace=1.0)


async def exchange(port: int, data: bytes, *, read_until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        if read_until_close:
            async with asyncio.timeout(5):
                return await reader.read()
        async with asyncio.timeout(5):
            return await reader.read(65536)
    finally:
        writer.close()


def get(target: str, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {target} HTTP/{version}\r\nHost: x\r\n{extra}\r\n".encode()


async def test_keep_alive_and_pipelining_answer_in_order(server: tuple[Recorder, int]) -> None:
    rec, port = server
    out = await exchange(port, get("/a") + get("/b") + get("/c", "Connection: close\r\n"))
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert out.index(b'"/a"') < out.index(b'"/b"') < out.index(b'"/c"')
    assert out.endswith(b'"body":""}')  # closed after the third, as asked
    assert [r.target for r in rec.requests] == ["/a", "/b", "/c"]


async def test_http10_closes_after_the_answer(server: tuple[Recorder, int]) -> None:
    _, port = server
    out = await exchange(port, get("/x", version="1.0"))
    assert out.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in out


async def test_bodies_fixed_chunked_and_expect_continue(server: tuple[Recorder, int]) -> None:
    _rec, port = server
    fixed = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    assert b'"body":"hello"' in await exchange(port, fixed)
    chunked = (
        b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )
    assert b'"body":"abcdefg"' in await exchange(port, chunked)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ok")
    assert b'"body":"ok"' in await reader.read()
    writer.close()


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413, "body_too_large"),
        (
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"3e8\r\n"
            + b"x" * 1000
            + b"\r\n3e8\r\n"
            + b"x" * 1000
            + b"\r\n",
            413,
            "body_too_large",
        ),
        (get("/" + "a" * 9000), 414, "uri_too_long"),
        (
            get("/a", "".join(f"X-H{i}: {'v' * 100}\r\n" for i in range(700))),
            431,
            "headers_too_large",
        ),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "bad_request"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
            "bad_request",
        ),
    ],
)
async def test_bad_requests_are_refused_with_json_and_closed(
    server: tuple[Recorder, int], data: bytes, status: int, code: str
) -> None:
    rec, port = server
    out = await exchange(port, data)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert f"X-Bascule-Error: {code}".encode() in head
    assert b"Connection: close" in head
    error = orjson.loads(body)["error"]
    assert error["code"] == code
    if status == 413:
        assert error["dataset"] == "dcir"
    assert rec.requests == []  # nothing reached the handler


async def test_a_slow_request_gets_408_and_an_idle_connection_is_closed(
    server: tuple[Recorder, int],
) -> None:
    _, port = server
    out = await exchange(port, b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    assert out.startswith(b"HTTP/1.1 408 ")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    async with asyncio.timeout(3):
        assert await reader.read() == b""  # idle: closed, nothing said
    writer.close()


async def test_a_handler_finishes_when_its_client_hangs_up(server: tuple[Recorder, int]) -> None:
    rec, port = server
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/slow"))
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.6)
    assert rec.finished == ["/slow"]


async def test_a_failing_handler_answers_500_and_the_connection_lives_on(
    server: tuple[Recorder, int],
) -> None:
    _, port = server
    out = await exchange(port, get("/boom") + get("/after", "Connection: close\r\n"))
    assert out.startswith(b"HTTP/1.1 500 ")
    assert b'"internal_error"' in out and b"a bug" not in out
    assert b'"/after"' in out


async def test_streamed_answers_are_chunked_and_head_has_no_body(
    server: tuple[Recorder, int],
) -> None:
    _, port = server
    out = await exchange(port, get("/stream", "Connection: close\r\n"))
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    decoded = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        decoded += rest[:n]
        body = rest[n + 2 :]
        if n == 0:
            break
    assert decoded == b"".join(str(i).encode() * 10_000 for i in range(5))
    out = await exchange(port, b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.endswith(b"\r\n\r\n") and b"Content-Length: 1234" in out


async def test_an_upgrade_is_answered_as_plain_http_then_closed(
    server: tuple[Recorder, int],
) -> None:
    rec, port = server
    out = await exchange(port, get("/u", "Connection: Upgrade\r\nUpgrade: websocket\r\n") + b"junk")
    assert out.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in out
    assert [r.target for r in rec.requests] == ["/u"]


async def test_a_refusal_before_the_body_is_read_reaches_a_client_still_sending() -> None:
    """A handler answers without reading the body (a refusal): the body is read and dropped
    before the connection closes, so the client still sending it gets the answer, not a
    reset; and no 100 Continue is sent to a client that waits for one."""

    async def refuse(request: Request, out: Responder) -> None:
        await out.send(409, [("Content-Type", "text/plain")], b"refused")

    srv = Server(refuse, max_body_bytes=4 * 1024 * 1024)
    port = await srv.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b"z" * (2 * 1024 * 1024)
        writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        for at in range(0, len(body), 65536):
            writer.write(body[at : at + 65536])
            await writer.drain()
            await asyncio.sleep(0.001)
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 409 ") and b"Connection: close" in answer
        assert answer.endswith(b"refused")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 409 "), answer  # no 100 Continue before it
    finally:
        await srv.close(grace=1.0)
