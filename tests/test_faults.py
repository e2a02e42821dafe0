"""The fault proxy, proved against real peers: Postgres, Redis, an aiohttp server, raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.faults import CHUNK, FaultProxy, fault_proxy, upstream_of

PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"

# asyncio may run a timer up to its clock resolution early; lower bounds allow for that.
SLACK = 0.01

# What asyncpg raises on a connection the proxy broke: "connection is closed" if it saw the
# close while idle, "closed in the middle of operation" if the close landed mid-query.
CONNECTION_LOST = (asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError)

LoopErrors = list[dict[str, Any]]


@pytest.fixture
async def loop_errors() -> AsyncIterator[LoopErrors]:
    """Fails the test if anything reaches the loop's exception handler, e.g. a proxy task's
    "Task exception was never retrieved", including at garbage collection."""
    loop = asyncio.get_running_loop()
    errors: LoopErrors = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    gc.collect()
    loop.set_exception_handler(previous)
    assert errors == []


@pytest.fixture
async def pg_proxy(loop_errors: LoopErrors) -> AsyncIterator[FaultProxy]:
    async with fault_proxy(PG_URL) as proxy:
        yield proxy


class EchoServer:
    """A loopback server that echoes every chunk, answers EOF with ``<eof>`` and then closes,
    and notes how each connection ended ("eof" or "reset")."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.endings: list[str] = []
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                self.received += data
                writer.write(data)
                await writer.drain()
            self.endings.append("eof")
            writer.write(b"<eof>")
            await writer.drain()
        except ConnectionResetError:
            self.endings.append("reset")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    echo = EchoServer()
    server = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    echo.url = f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield echo


@pytest.fixture
async def echo_proxy(echo: EchoServer, loop_errors: LoopErrors) -> AsyncIterator[FaultProxy]:
    async with fault_proxy(echo.url) as proxy:
        yield proxy


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def dial(proxy: FaultProxy) -> AsyncIterator[Stream]:
    """A raw TCP connection to the proxy, closed on exit whatever state it is in."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def eventually(check: Callable[[], bool], seconds: float = 3.0) -> None:
    async with asyncio.timeout(seconds):
        while not check():
            await asyncio.sleep(0.01)


async def read_until_eof(reader: asyncio.StreamReader, seconds: float = 3.0) -> bytes:
    async with asyncio.timeout(seconds):
        return await reader.read()


async def nothing_arrives(reader: asyncio.StreamReader, seconds: float = 0.3) -> bool:
    """True if not a byte (nor EOF, nor reset) arrives within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            await reader.read(1)
    except TimeoutError:
        return True
    return False


def test_url_points_at_the_proxy() -> None:
    proxy = FaultProxy("127.0.0.1", 5432, port=40001)
    assert (
        proxy.url("postgresql://user:pw@127.0.0.1:5432/db?sslmode=disable")
        == "postgresql://user:pw@127.0.0.1:40001/db?sslmode=disable"
    )
    assert proxy.url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:40001/0"
    assert proxy.url("http://localhost:8080/a?b=1") == "http://127.0.0.1:40001/a?b=1"
    assert upstream_of("postgresql://u@db.local/x") == ("db.local", 5432)
    assert upstream_of("redis://127.0.0.1/0") == ("127.0.0.1", 6379)
    assert upstream_of("http://127.0.0.1:8080") == ("127.0.0.1", 8080)
    with pytest.raises(ValueError):
        upstream_of("postgresql:///db?host=/run/postgresql")


async def test_postgres_passes(pg_proxy: FaultProxy) -> None:
    conn = await asyncpg.connect(pg_proxy.url(PG_URL))
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert pg_proxy.connections == 1
    finally:
        await conn.close()
    await eventually(lambda: pg_proxy.connections == 0)


async def test_postgres_pool_of_ten_runs_many_queries(pg_proxy: FaultProxy) -> None:
    async with asyncpg.create_pool(pg_proxy.url(PG_URL), min_size=10, max_size=10) as pool:
        answers = await asyncio.gather(*(pool.fetchval("SELECT $1::int", i) for i in range(1000)))
        assert answers == list(range(1000))
        assert pg_proxy.connections == 10
    await eventually(lambda: pg_proxy.connections == 0)


async def test_redis_passes(loop_errors: LoopErrors) -> None:
    key = f"faults:{uuid.uuid4().hex}:counter"
    async with fault_proxy(REDIS_URL) as proxy:
        pool = aioredis.BlockingConnectionPool.from_url(proxy.url(REDIS_URL), max_connections=10)
        client = aioredis.Redis(connection_pool=pool)
        try:
            assert await client.ping() is True
            await asyncio.gather(*(client.incr(key) for _ in range(2000)))
            assert await client.get(key) == b"2000"
            assert 1 <= proxy.connections <= 10
        finally:
            await client.delete(key)
            await client.aclose()
            await pool.aclose()


@pytest.fixture
async def http_url() -> AsyncIterator[str]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def echo_body(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_post("/echo", echo_body)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_http_passes(http_url: str, loop_errors: LoopErrors) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, many chunks
    async with (
        fault_proxy(http_url) as proxy,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=10)) as session,
    ):

        async def get() -> str:
            async with session.get(proxy.url(http_url)) as response:
                return await response.text()

        assert await asyncio.gather(*(get() for _ in range(300))) == ["hello"] * 300
        async with session.post(proxy.url(http_url) + "/echo", data=body) as response:
            assert await response.read() == body
        assert 1 <= proxy.connections <= 10


async def test_half_close_crosses_and_the_other_way_keeps_flowing(
    echo: EchoServer, echo_proxy: FaultProxy
) -> None:
    async with dial(echo_proxy) as (reader, writer):
        writer.write(b"ping")
        writer.write_eof()
        # The server only answers <eof> once it has seen our FIN, after the echo.
        assert await read_until_eof(reader) == b"ping<eof>"
    assert echo.endings == ["eof"]


async def test_latency_delays_both_directions(echo_proxy: FaultProxy) -> None:
    async with dial(echo_proxy) as (reader, writer):
        writer.write(b"warm")
        assert await reader.readexactly(4) == b"warm"
        echo_proxy.latency(0.2)  # applies to a connection already open
        started = time.monotonic()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert time.monotonic() - started >= 2 * 0.2 - SLACK


async def test_latency_slows_a_postgres_round_trip(pg_proxy: FaultProxy) -> None:
    pg_proxy.latency(0.2)
    conn = await asyncpg.connect(pg_proxy.url(PG_URL))
    try:
        started = time.monotonic()
        await conn.execute("SELECT 1")  # the simple protocol: one round trip
        assert time.monotonic() - started >= 2 * 0.2 - SLACK
    finally:
        await conn.close()


async def test_reset_sends_rst_to_both_peers(echo: EchoServer, echo_proxy: FaultProxy) -> None:
    async with dial(echo_proxy) as (reader, writer):
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        echo_proxy.reset()
        with pytest.raises(ConnectionResetError):
            await read_until_eof(reader)
    await eventually(lambda: echo.endings == ["reset"])
    async with dial(echo_proxy) as (reader, writer):
        with pytest.raises(ConnectionResetError):
            await read_until_eof(reader)
    assert echo.endings == ["reset"]  # the new connection never reached the server


async def test_reset_breaks_postgres(pg_proxy: FaultProxy) -> None:
    conn = await asyncpg.connect(pg_proxy.url(PG_URL))
    try:
        pg_proxy.reset()
        with pytest.raises(CONNECTION_LOST):
            await conn.fetchval("SELECT 1")
        with pytest.raises(ConnectionResetError):
            await asyncpg.connect(pg_proxy.url(PG_URL), timeout=3)
    finally:
        conn.terminate()


async def test_cut_closes_cleanly_with_fin(echo: EchoServer, echo_proxy: FaultProxy) -> None:
    async with dial(echo_proxy) as (reader, writer):
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        echo_proxy.cut()
        assert await read_until_eof(reader) == b""  # EOF, not ConnectionResetError
    await eventually(lambda: echo.endings == ["eof"])
    async with dial(echo_proxy) as (reader, writer):
        # Bytes sent before the proxy closes must not turn its FIN into a RST.
        writer.write(b"early")
        assert await read_until_eof(reader) == b""
    assert echo.endings == ["eof"]


async def test_cut_breaks_postgres(pg_proxy: FaultProxy) -> None:
    conn = await asyncpg.connect(pg_proxy.url(PG_URL))
    try:
        pg_proxy.cut()
        with pytest.raises(CONNECTION_LOST):
            await conn.fetchval("SELECT 1")
        with pytest.raises(ConnectionError):
            await asyncpg.connect(pg_proxy.url(PG_URL), timeout=3)
    finally:
        conn.terminate()


async def test_blackhole_hangs_postgres_without_closing(pg_proxy: FaultProxy) -> None:
    conn = await asyncpg.connect(pg_proxy.url(PG_URL))
    try:
        pg_proxy.blackhole()
        with pytest.raises(TimeoutError):
            await asyncpg.connect(pg_proxy.url(PG_URL), timeout=1)
        # The attempt was accepted and is still held, not refused or closed.
        assert pg_proxy.connections == 2
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1):
                await conn.fetchval("SELECT 1")
        assert not conn.is_closed()
        assert pg_proxy.connections >= 2
    finally:
        conn.terminate()


async def test_blackhole_drops_bytes_and_closes_nothing(
    echo: EchoServer, echo_proxy: FaultProxy
) -> None:
    async with dial(echo_proxy) as (reader, writer):
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        echo_proxy.blackhole()
        writer.write(b"lost" * 10_000)
        await writer.drain()  # the proxy reads and drops, so sending never blocks or fails
        assert await nothing_arrives(reader)
    # Our close did not cross either: the server's side is still open, and still held.
    await asyncio.sleep(0.2)
    assert bytes(echo.received) == b"ping"
    assert echo.endings == []
    assert echo_proxy.connections == 1


async def test_reset_ends_a_partition(echo: EchoServer, echo_proxy: FaultProxy) -> None:
    async with dial(echo_proxy) as (reader, writer):
        echo_proxy.blackhole()
        writer.write(b"lost")
        assert await nothing_arrives(reader)
        echo_proxy.reset()
        with pytest.raises(ConnectionResetError):
            await read_until_eof(reader)
    await eventually(lambda: echo.endings == ["reset"])


async def test_cut_ends_a_partition_whose_client_left(
    echo: EchoServer, echo_proxy: FaultProxy
) -> None:
    async with dial(echo_proxy) as (reader, writer):
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        echo_proxy.blackhole()
    await asyncio.sleep(0.2)
    assert echo_proxy.connections == 1  # held, though the client is gone
    assert echo.endings == []
    echo_proxy.cut()
    await eventually(lambda: echo_proxy.connections == 0)
    await eventually(lambda: echo.endings == ["eof"])


@pytest.mark.parametrize("fault", ["reset", "cut", "blackhole"])
async def test_heal_lets_new_connections_pass(pg_proxy: FaultProxy, fault: str) -> None:
    getattr(pg_proxy, fault)()
    with pytest.raises((ConnectionError, TimeoutError)):
        await asyncpg.connect(pg_proxy.url(PG_URL), timeout=0.5)
    pg_proxy.heal()
    conn = await asyncpg.connect(pg_proxy.url(PG_URL), timeout=3)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_a_blackholed_connection_stays_silent_after_heal(echo_proxy: FaultProxy) -> None:
    async with dial(echo_proxy) as (old_reader, old_writer):
        echo_proxy.blackhole()
        echo_proxy.heal()
        old_writer.write(b"ping")
        async with dial(echo_proxy) as (reader, writer):
            writer.write(b"pong")
            assert await reader.readexactly(4) == b"pong"
        assert await nothing_arrives(old_reader)


async def test_an_unreachable_upstream_looks_like_a_reset(loop_errors: LoopErrors) -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    async with FaultProxy("127.0.0.1", port) as proxy, dial(proxy) as (reader, _):
        with pytest.raises(ConnectionResetError):
            await read_until_eof(reader)


async def test_stop_closes_everything_and_leaves_no_task(
    echo: EchoServer, loop_errors: LoopErrors
) -> None:
    def proxy_tasks() -> list[str]:
        prefix = f"fault-proxy:{proxy.port} "
        return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(prefix)]

    proxy = FaultProxy(*upstream_of(echo.url))
    await proxy.start()
    try:
        async with dial(proxy) as (passing, writer):
            writer.write(b"ping")
            assert await passing.readexactly(4) == b"ping"
            proxy.blackhole()
            async with dial(proxy) as (held, _):
                await eventually(lambda: proxy.connections == 2)
                assert len(proxy_tasks()) >= 3  # two links and at least one pump
                await proxy.stop()
                assert proxy_tasks() == []
                assert proxy.connections == 0
                assert await read_until_eof(passing) == b""
                assert await read_until_eof(held) == b""
    finally:
        await proxy.stop()
    # The listener is closed too.
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(proxy.host, proxy.port)
