"""Researcher requests (issue 16): never a 500, never unbounded memory, never a refusal the
backend would not make.

Each test was written failing against the code before its fix: a 5,000-digit id and an
``M-SEARCH`` answered 500 with a traceback each; a client pipelining without reading grew the
proxy's buffers without bound; a closed connection waited for the cyclic collector; a read's
body was buffered whole before the backend saw a byte; answer trailers became headers; paths
the backend serves were refused; ``100 Continue`` went out before a refusal; an answer broken
mid-stream was an ERROR with a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import json
import logging
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bascule.sealing import Sealer
from bascule.stages import Stage
from proxy.server import FEED_SLICE, Request, Responder, Server
from refapi.lab import AUTH, JOURNAL_KEY
from tests.conftest import Ground
from tests.proxy.test_hardening import raw_request, seeing_backend
from tests.world import LIVE, World, build_world

pytestmark = pytest.mark.timeout(90)


@asynccontextmanager
async def raw_backend(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A backend written byte by byte: ``answer(reader, writer)`` per connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[str, int]:
    """The request line and Content-Length of the next request (its body left unread)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    length = 0
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return head.split("\r\n", 1)[0], length


# --- item 6: a 5,000-digit id, an M-SEARCH: a clear 4xx, no log flood -------------------------


async def test_a_huge_id_and_odd_methods_get_a_clear_answer_and_no_log_flood(
    ground: Ground,
) -> None:
    """500 requests of each kind added 430 KB of tracebacks to the log, each answered 500."""
    async with build_world(ground, processes=True, rows=3) as world:
        log = ground.tmp_path / "proxy0.log"
        huge = "9" * 5000
        dcir = f"{world.proxy}/v1/datasets/dcir/records"
        before = log.stat().st_size
        statuses: dict[str, set[int]] = {}
        async with aiohttp.ClientSession(headers=AUTH) as session:

            async def send(kind: str, method: str, url: str, **kw: object) -> None:
                async with session.request(method, url, **kw) as resp:  # type: ignore[arg-type]
                    await resp.read()
                    statuses.setdefault(kind, set()).add(resp.status)

            for _ in range(125):
                await send("get huge id", "GET", f"{dcir}/{huge}")
                await send("put huge id", "PUT", f"{dcir}/{huge}", json={"amount": 1})
                await send("m-search", "M-SEARCH", f"{dcir}/1")
                await send("m-search unrouted", "M-SEARCH", f"{world.proxy}/ssdp")
            await world.to_stage(*LIVE)  # past source: writes are journaled
            for _ in range(125):
                await send("put huge id, live", "PUT", f"{dcir}/{huge}", json={"amount": 1})
                await send("m-search, live", "M-SEARCH", f"{world.proxy}/ssdp")
        # The backend's own answers (invalid id, method not allowed, not found), or bascule's
        # refusal of an unrouted write once datasets are past source.
        assert statuses == {
            "get huge id": {400},
            "put huge id": {400},
            "m-search": {405},
            "m-search unrouted": {404},
            "put huge id, live": {400},
            "m-search, live": {409},
        }, statuses
        added = log.read_bytes()[before:].decode(errors="replace")
        assert "Traceback" not in added, added[:3000]
        assert len(added) < 20_000, f"{len(added)} bytes of log for 1,000 requests"


# --- item 7: a client that pipelines and never reads -------------------------------------------


async def test_a_client_that_pipelines_and_never_reads_is_held_at_a_bounded_buffer() -> None:
    """Answers were written without waiting for the client to take them: 2,000 pipelined
    requests of 16 KiB answers left ~30 MB in the connection's write buffer."""
    answer = b"x" * 16384
    handled = 0

    async def handle(request: Request, out: Responder) -> None:
        nonlocal handled
        handled += 1
        await out.send(200, [("Content-Type", "text/plain")], answer)

    server = Server(handle, max_body_bytes=1000)
    port = await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    greedy = socket.socket()
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    greedy.setblocking(False)
    try:
        await loop.sock_connect(greedy, ("127.0.0.1", port))
        pipelined = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
        sending = asyncio.ensure_future(loop.sock_sendall(greedy, pipelined))  # noqa: TID251
        # Until the proxy stops answering (it waits for the client) or has answered them all.
        seen, still = -1, 0
        while still < 5 and handled < 2000:
            await asyncio.sleep(0.1)
            still = still + 1 if handled == seen else 0
            seen = handled
        (conn,) = server.connections
        assert conn.transport is not None
        buffered = conn.transport.get_write_buffer_size()
        assert handled < 2000, f"answered all {handled}: {buffered} bytes left buffered"
        assert buffered <= 256 * 1024, buffered
        assert len(conn.queue) <= 8 + FEED_SLICE // 20, len(conn.queue)
        # Another client is served meanwhile.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await reader.read()).startswith(b"HTTP/1.1 200 OK")
        writer.close()
        sending.cancel()
    finally:
        greedy.close()
        await server.close(grace=1.0)


# --- item 8: a closed connection is freed at once; a read's body streams ----------------------


async def test_a_closed_connection_is_freed_without_the_cyclic_collector() -> None:
    """The connection and its parser referenced each other: each closed connection, with the
    last body it received, waited for the cyclic garbage collector."""
    refs: list[weakref.ref[object]] = []

    async def handle(request: Request, out: Responder) -> None:
        (conn,) = server.connections
        refs.append(weakref.ref(conn))
        body = await request.read()
        await out.send(200, [], str(len(body)).encode())

    server = Server(handle, max_body_bytes=4 * 1024 * 1024)
    port = await server.start("127.0.0.1", 0)
    gc.collect()
    gc.disable()
    try:
        for close in (True, False):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = b"y" * (1024 * 1024)
            extra = "Connection: close\r\n" if close else ""
            sent = f"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            writer.write(sent.encode() + body)
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 OK"), head
                if not close:
                    writer.close()  # the client hangs up a kept-alive connection
                await reader.read()
            writer.close()
            for _ in range(20):
                await asyncio.sleep(0.05)
                if refs[-1]() is None:
                    break
        assert [ref() is None for ref in refs] == [True, True]
    finally:
        gc.enable()
        await server.close(grace=1.0)


async def test_a_reads_body_streams_to_the_backend(ground: Ground) -> None:
    """A read's body went to the backend only once it had arrived whole (buffered up to
    ``max_body_bytes``, 1 MiB here, in memory): the backend now sees its start before its end
    is sent, and the whole of it byte for byte."""
    first = b"a" * (400 * 1024)
    rest = b"b" * (400 * 1024)
    got_start = asyncio.Event()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, length = await read_request(reader)
        digest, n = hashlib.sha256(), 0
        while n < length:
            chunk = await reader.read(65536)
            if not chunk:
                return
            digest.update(chunk)
            n += len(chunk)
            if n >= 256 * 1024:
                got_start.set()
        body = orjson.dumps({"line": line, "length": n, "sha256": digest.hexdigest()})
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        await writer.drain()

    async with (
        raw_backend(backend) as url,
        build_world(ground, backends=(url, url), extra="") as world,
    ):
        port = int(world.proxy.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/datasets/dcir/query HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (len(first) + len(rest))
        )
        writer.write(first)
        await writer.drain()
        async with asyncio.timeout(5):
            await got_start.wait()  # the end of the body is not sent yet
        writer.write(rest)
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK"), answer[:300]
        seen = orjson.loads(body)
        assert seen == {
            "line": "POST /v1/datasets/dcir/query HTTP/1.1",
            "length": len(first) + len(rest),
            "sha256": hashlib.sha256(first + rest).hexdigest(),
        }


# --- item 10: answer trailers never become headers ---------------------------------------------


def chunked_with_trailers(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"Trailer: X-Trailer-Leak\r\n\r\n"
        b"%x\r\n%b\r\n0\r\nX-Trailer-Leak: from-the-trailer\r\n\r\n" % (len(body), body)
    )


async def test_answer_trailers_never_become_headers(ground: Ground) -> None:
    """A chunked answer's trailers were merged into its headers: on a write they reached the
    researcher as headers and were sealed into the journal entry."""

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, length = await read_request(reader)
            await reader.readexactly(length)
            writer.write(chunked_with_trailers(b'{"record": {"id": 7}}'))
            await writer.drain()

    async with (
        raw_backend(backend) as url,
        build_world(ground, backends=(url, url), stages=(Stage.DUALWRITE,)) as world,
    ):
        for method, body in (("GET", b""), ("PATCH", b'{"amount": 1}')):
            head = (
                f"{method} /v1/datasets/dcir/records/7 HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            status, headers, answer = await raw_request(world.proxy, head, body)
            assert status == 200, (method, headers, answer)
            assert b"x-trailer-leak" not in headers.lower(), (method, headers)
        rows = await world.sql(world.state_db, "SELECT answer FROM bascule_journal")
        assert len(rows) == 1
        sealer = Sealer(bytes.fromhex(JOURNAL_KEY))
        stored = json.loads(sealer.open(rows[0]["answer"], dataset="dcir", field="answer"))
        names = [name.lower() for name, _ in stored["headers"]]
        assert "x-trailer-leak" not in names, names
        assert base64.b64decode(stored["body"]) == b'{"record": {"id": 7}}'


# --- item 11: what the backend would serve reaches it -----------------------------------------


@pytest.fixture
async def seeing(ground: Ground) -> AsyncIterator[World]:
    async with build_world(ground, backends=seeing_backend, read_timeout=2.0) as world:
        yield world


def get(target: str, method: str = "GET") -> bytes:
    return (
        f"{method} {target} HTTP/1.1\r\nHost: proxy.example\r\nConnection: close\r\n\r\n".encode()
    )


PLAIN_PASSES = [
    "/v1/datasets//dcir/records?a=1&a=2&b=%2F",
    "/v1/datasets/dcir/records/a%2Fb",
    "/v1/datasets/dcir/records/7;jsessionid=x",
    "/v1/datasets/dcir/./records/",
    "/v1/datasets/dcir/records/..%2F..%2Fpmsi",
    "/v1/datasets/dcir/records/abc",  # not an integer id: the API's own answer
    "/v1/datasets/dcir/records/%zz",
]


@pytest.mark.parametrize("target", PLAIN_PASSES)
async def test_reads_reach_the_backend_byte_for_byte_at_source(seeing: World, target: str) -> None:
    """Each was refused 400 `bad_path` or `bad_key` by bascule, at `source` where nothing is
    journaled and one side serves every dataset."""
    status, headers, body = await raw_request(seeing.proxy, get(target))
    assert status == 200 and b"x-bascule-error" not in headers.lower(), (status, body)
    seen = orjson.loads(body)
    assert seen["raw_path"] == target and seen["served_by"] == "azure"


async def test_writes_at_source_reach_the_backend_even_when_ambiguous(seeing: World) -> None:
    for target in ("/v1/datasets//dcir/records", "/v1/datasets/dcir/records/abc;x"):
        head = (
            f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
        ).encode()
        status, headers, body = await raw_request(seeing.proxy, head, b"{}")
        assert status == 200 and b"x-bascule-error" not in headers.lower(), (target, body)
        assert orjson.loads(body)["raw_path"] == target


async def test_absolute_form_and_options_star_are_served(seeing: World) -> None:
    status, headers, body = await raw_request(
        seeing.proxy, get("http://api.example/v1/datasets/dcir/records/7?x=1")
    )
    assert status == 200, body
    seen = orjson.loads(body)
    assert seen["raw_path"] == "/v1/datasets/dcir/records/7?x=1"  # in origin form
    forwarded = {k.lower(): v for k, v in seen["headers"]}
    assert forwarded["x-forwarded-host"] == "api.example"
    # `OPTIONS *` reaches the backend as is: aiohttp's own answer, not bascule's.
    status, headers, body = await raw_request(seeing.proxy, get("*", "OPTIONS"))
    assert b"x-bascule-error" not in headers.lower(), (status, headers, body)


async def test_ambiguous_reads_are_served_by_the_one_side_every_reading_agrees_on(
    seeing: World,
) -> None:
    """A path the backend could read as dcir's or as something unrouted (`default`'s): served
    while both are served by one side, refused when they are not — the other side may not
    hold the answer (a gap), and bascule cannot tell which dataset the backend will read."""
    target = "/v1/datasets//dcir/records/7"
    await seeing.to_stage(*LIVE, dataset="pmsi")  # another dataset moved: no matter
    status, _, body = await raw_request(seeing.proxy, get(target))
    assert status == 200 and orjson.loads(body)["served_by"] == "azure"
    await seeing.to_stage(*LIVE)  # dcir served by the target, `default` by the source
    status, _, body = await raw_request(seeing.proxy, get(target))
    assert status == 400, body
    error = orjson.loads(body)["error"]
    assert error["code"] == "ambiguous_path"
    assert "dcir" in error["message"] and "default" in error["message"]
    await seeing.to_stage(*LIVE, dataset="default")  # both served by the target now
    status, _, body = await raw_request(seeing.proxy, get(target))
    assert status == 200 and orjson.loads(body)["served_by"] == "scaleway"
    # A key bascule cannot name: its dataset is known, so it is served by dcir's side.
    status, _, body = await raw_request(seeing.proxy, get("/v1/datasets/dcir/records/abc"))
    assert status == 200 and orjson.loads(body)["served_by"] == "scaleway"


async def test_a_write_past_source_that_cannot_be_named_is_refused(seeing: World) -> None:
    await seeing.to_stage(*LIVE)
    for target, code in (
        ("/v1/datasets//dcir/records/7", "bad_path"),
        ("/v1/datasets/dcir/records/7;x", "bad_path"),
        ("/v1/datasets/dcir/records/abc", "bad_key"),
    ):
        head = (
            f"PATCH {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
        ).encode()
        status, _, body = await raw_request(seeing.proxy, head, b"{}")
        assert status == 400 and orjson.loads(body)["error"]["code"] == code, (target, body)


async def test_no_100_continue_before_a_refusal(seeing: World) -> None:
    """`100 Continue` went out as soon as the headers arrived: a client sent its whole body
    for a write about to be refused with 409."""
    await seeing.to_stage(Stage.DUALWRITE, dataset="default")
    port = int(seeing.proxy.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v2/unrouted HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 409 "), head
    writer.close()
    # A request that is served gets its 100 Continue when its body is wanted.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/datasets/dcir/query HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    async with asyncio.timeout(5):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"{}")
        assert (await reader.read()).startswith(b"HTTP/1.1 200 OK")
    writer.close()


async def test_odd_methods_reach_the_backend_or_get_a_clear_refusal(
    seeing: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Any method llhttp parses is forwarded as the backend would get it (the unknown ones
    as unrouted writes); bascule itself answers only what it will not forward, in one
    clear JSON error: a tunnel (CONNECT, 501), and what is not HTTP/1.1 (400)."""
    caplog.set_level(logging.INFO)
    for line in (b"PROPFIND /v1/datasets/dcir/records", b"M-SEARCH /ssdp", b"QUERY /q"):
        status, headers, body = await raw_request(seeing.proxy, get_line(line))
        assert status == 200 and b"x-bascule-error" not in headers.lower(), (line, body)
        assert orjson.loads(body)["served_by"] == "azure"
    for line, status_code in (
        (b"CONNECT example.com:443", (501, "not_implemented")),
        (b"FOO /x", (400, "bad_request")),
        (b"get /x", (400, "bad_request")),
    ):
        status, _, body = await raw_request(seeing.proxy, get_line(line))
        assert (status, orjson.loads(body)["error"]["code"]) == status_code, (line, body)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def get_line(line: bytes) -> bytes:
    return line + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


_PIECES = [
    *"abz09.;#?=&~-_\\",
    "/",
    "//",
    "%2F",
    "%2e",
    "%5C",
    "%zz",
    "%00",
    "%ff",
    "..",
    "v1",
    "datasets",
    "dcir",
    "pmsi",
    "secret",
    "records",
    "query",
    "7",
    "007",
    "9" * 5000,
]
_TARGETS = st.one_of(
    st.lists(st.sampled_from(_PIECES), max_size=10).map(lambda p: "/" + "".join(p)),
    st.sampled_from(["*", "http://h.example/v1/datasets/dcir/records/7?x=1", "h:443", "http://h"]),
)
_METHODS = st.sampled_from(
    [
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
        "OPTIONS",
        "TRACE",
        "QUERY",
        "M-SEARCH",
        "PROPFIND",
        "CONNECT",
        "FOO",
        "get",
    ]
)
_BODIES = st.sampled_from(["", "len", "chunked", "expect"])


def _raw(method: str, target: str, body: str) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    payload = b'{"amount": 1}'
    if body == "len":
        return (head + f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    if body == "expect":
        head += f"Expect: 100-continue\r\nContent-Length: {len(payload)}\r\n\r\n"
        return head.encode() + payload
    if body == "chunked":
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"3\r\nabc\r\n0\r\n\r\n"
    return (head + "\r\n").encode()


async def test_random_requests_never_get_a_500_and_the_proxy_keeps_serving(
    seeing: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Random and malformed request lines, targets and bodies, with dcir past `source` (its
    writes journaled) and the other datasets at it: never a 500, never a log line at ERROR,
    every refusal bascule's JSON, and the proxy serves a plain read after each."""
    caplog.set_level(logging.WARNING)
    await seeing.to_stage(*LIVE)
    loop = asyncio.get_running_loop()

    async def one(method: str, target: str, body: str) -> None:
        try:
            status, headers, answer = await raw_request(seeing.proxy, _raw(method, target, body))
        except (ValueError, IndexError):  # nothing came back
            status, headers, answer = 0, b"", b""
        if status == 100:  # the interim answer to Expect: the final one follows it
            status = int(answer.split(b" ", 2)[1])
            headers, _, answer = answer.partition(b"\r\n\r\n")
        assert status not in (0, 500), (method, target[:80], body, headers, answer[:300])
        if b"x-bascule-error" in headers.lower():
            assert orjson.loads(answer)["error"]["code"]
        plain = get("/v1/datasets/pmsi/records/1")
        assert (await raw_request(seeing.proxy, plain))[0] == 200

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(method=_METHODS, target=_TARGETS, body=_BODIES)
    def check(method: str, target: str, body: str) -> None:
        asyncio.run_coroutine_threadsafe(one(method, target, body), loop).result(timeout=30)

    await loop.run_in_executor(None, check)
    # bascule's own log (the stand-in backend, aiohttp, logs what it cannot parse itself).
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and r.name != "aiohttp.server"
    ]
    assert not errors, [(r.name, r.getMessage()) for r in errors]


# --- item 13: an answer that breaks mid-stream --------------------------------------------------


async def test_an_answer_broken_mid_stream_is_one_warning_line(
    ground: Ground, caplog: pytest.LogCaptureFixture
) -> None:
    """The researcher is told (the connection ends short of the announced length); the log
    said it at ERROR with a traceback."""

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 400000\r\n\r\n" + b"z" * 100_000)
        await writer.drain()

    async with (
        raw_backend(backend) as url,
        build_world(ground, backends=(url, url)) as world,
    ):
        caplog.set_level(logging.INFO)
        caplog.clear()
        head = get("/v1/datasets/dcir/records/12345")
        status, _, body = await raw_request(world.proxy, head)
        assert status == 200 and len(body) < 400_000
    mine = [r for r in caplog.records if r.name.startswith("bascule")]
    broke = [r for r in mine if "broke" in r.getMessage()]
    assert [r.levelname for r in broke] == ["WARNING"], [
        (r.levelname, r.getMessage()) for r in mine
    ]
    (record,) = broke
    assert record.exc_info is None
    message = record.getMessage()
    assert "/v1/datasets/{dataset}/records/{id}" in message and "azure" in message
    assert "12345" not in message
    assert not [r for r in mine if r.levelno >= logging.ERROR]
