"""Parts of test worlds: servers on loopback (reference APIs, proxies, processes), the one HTTP
relay that rewrites answers, and the CLI as an SRE runs it."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from yarl import URL

from bascule.config import Config
from bascule.procs import ServerProcess, bascule_argv
from bascule.state.servers import free_port, free_ports
from proxy.server import Server
from refapi.app import create_app
from refapi.lab import POOL_SIZE, RESEARCHER_TOKEN, SERVICE_TOKEN, write_config
from refapi.state import RECEIVED_KEPT, Received


@asynccontextmanager
async def serve_app(
    app: web.Application | web.Server, port: int | None = None
) -> AsyncIterator[str]:
    """Run ``app`` (or a low-level server) on a loopback port; yield its base URL."""
    runner: web.BaseRunner = (
        web.ServerRunner(app)
        if isinstance(app, web.Server)
        else web.AppRunner(app, access_log=None)
    )
    await runner.setup()
    port = port or free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def catch_all(handler: Handler, *, client_max_size: int = 1024**2) -> web.Application:
    """An app answering every method on every path with ``handler``: a stand-in backend."""
    app = web.Application(client_max_size=client_max_size)
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


Forward = Callable[[], Awaitable[web.Response]]
"""Sends the relayed request to the backend (which applies it) and gives back its answer."""
Hook = Callable[[web.Request, Forward], Awaitable[web.StreamResponse]]
"""Answers one request a relay received, calling ``forward()`` when and if it wants to."""

# The backend's answer headers a relay passes on (its framing is the relay's own).
RELAYED = ("Content-Type", "Content-Encoding", "Idempotency-Replayed", "X-Served-By")


async def passthrough(request: web.Request, forward: Forward) -> web.StreamResponse:
    return await forward()


def late(delay: float = 2.0) -> Hook:
    """A relay hook: the backend applies each request at once, its answer comes ``delay``
    seconds late (a slow network, a busy gateway)."""

    async def hook(request: web.Request, forward: Forward) -> web.StreamResponse:
        answer = await forward()
        await asyncio.sleep(delay)
        return answer

    return hook


@asynccontextmanager
async def relay(backend: str, hook: Hook = passthrough) -> AsyncIterator[str]:
    """An HTTP relay in front of ``backend``, the one fault injector that speaks HTTP: for each
    request, ``hook(request, forward)`` decides what the client gets — the backend's answer
    (``forward()`` makes the backend apply the request, and returns its answer as sent, never
    decoded), an answer of its own after the backend committed (a 504, a gzipped body...),
    either one late, or no forwarding at all. Faults below HTTP (latency, reset, cut,
    blackhole) are :class:`tests.faults.FaultProxy`'s."""
    client = aiohttp.ClientSession(auto_decompress=False)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        drop = ("host", "content-length")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in drop}

        async def forward() -> web.Response:
            # The request target as received, not re-encoded: a path's spelling is the test's.
            target = URL(backend + request.raw_path, encoded=True)
            async with client.request(request.method, target, data=body, headers=headers) as resp:
                answer = web.Response(status=resp.status, body=await resp.read())
                for name in RELAYED:
                    if name in resp.headers:
                        answer.headers[name] = resp.headers[name]
                return answer

        return await hook(request, forward)

    try:
        async with serve_app(catch_all(handle)) as url:
            yield url
    finally:
        await client.close()


@asynccontextmanager
async def serve_proxy(server: Server) -> AsyncIterator[str]:
    """Run bascule's researcher-facing server on a loopback port; yield its base URL."""
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.close(grace=1.0)


class RestartableRefapi:
    """A reference API on a fixed loopback port that a test can really stop and start again.

    ``stop()`` closes the listening socket and ends every connection (idle keep-alives
    included, in-flight requests after ``shutdown_timeout``), so a client gets *connection
    refused*, as from a backend that went down; ``start()`` serves a fresh app on the *same*
    port over the same database. ``async with`` starts it and stops it at the end.
    """

    def __init__(
        self,
        name: str,
        database_url: str,
        *,
        port: int | None = None,
        shutdown_timeout: float = 1.0,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        **kwargs: bool,
    ) -> None:
        """``ssl_context``: serve https (:func:`refapi.app.tls_context`); ``host``: the name in
        :attr:`url` (the server listens on 127.0.0.1 either way), for a certificate's name."""
        self.name = name
        self.database_url = database_url
        self.port = port or free_port()
        self.ssl_context = ssl_context
        self.url = f"{'https' if ssl_context else 'http'}://{host}:{self.port}"
        self.shutdown_timeout = shutdown_timeout
        self.kwargs = kwargs
        self._runner: web.AppRunner | None = None
        self.received: deque[Received] = deque(maxlen=RECEIVED_KEPT)
        """Each request's trace context, across restarts (``refapi.state.RECEIVED``)."""

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Serve on :attr:`port` (again); waits up to 5 s for the port to be free."""
        if self._runner is not None:
            return
        app = create_app(
            self.name,
            self.database_url,
            [RESEARCHER_TOKEN, SERVICE_TOKEN],
            pool_size=POOL_SIZE,
            received=self.received,
            **self.kwargs,
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.shutdown_timeout)
        await runner.setup()
        deadline = asyncio.get_running_loop().time() + 5.0
        while True:
            try:
                await web.TCPSite(
                    runner, "127.0.0.1", self.port, ssl_context=self.ssl_context
                ).start()
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or asyncio.get_running_loop().time() > deadline:
                    await runner.cleanup()
                    raise
                await asyncio.sleep(0.05)
        self._runner = runner

    async def stop(self) -> None:
        """Close the listening socket and every connection; nothing answers on the port."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> RestartableRefapi:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def refuses_connections(url: str) -> bool:
    """True when nothing listens at ``url``'s loopback port (the connection is refused)."""
    port = int(url.rsplit(":", 1)[1])
    try:
        async with asyncio.timeout(1.0):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


@asynccontextmanager
async def garbage_server() -> AsyncIterator[str]:
    """A TCP server that answers anything with bytes that are not HTTP."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"\x00\x01 this is not HTTP at all \xff\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def fetch(database: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    """Run ``statement`` on ``database`` behind bascule's back, on a session of its own; its
    rows."""
    conn = await asyncpg.connect(database)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(statement, *args)
        return rows
    finally:
        await conn.close()


def closed_port_url() -> str:
    """A loopback URL on which nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def dcir_record(n: int, amount: float = 25.0) -> dict[str, object]:
    """A valid dcir record for the reference API (synthetic, pseudonymous)."""
    return {
        "patient_id": f"P{n:016x}",
        "act_code": "C",
        "act_date": "2024-03-01",
        "amount": amount,
        "prescriber_speciality": "01",
        "department": "75",
    }


@dataclass
class ProxyProcess:
    """A `bascule proxy` process started by a test."""

    proc: ServerProcess
    url: str
    admin_url: str


async def start_proxy(
    stack: AsyncExitStack, config: Path, log: Path, env: dict[str, str], workers: int = 1
) -> ProxyProcess:
    """Start `bascule proxy` (``--workers``) on free ports, ready; it is stopped when
    ``stack`` closes."""
    port, admin = free_ports(2)
    proc = ServerProcess(
        name=log.stem,
        argv=bascule_argv(
            "proxy",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
            "--workers",
            str(workers),
        ),
        health_url=f"http://127.0.0.1:{admin}/readyz",
        log_path=log,
        env=env,
    )
    stack.push_async_callback(proc.stop)
    await proc.start()
    return ProxyProcess(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}")


NOWHERE = "http://127.0.0.1:9"
"""A backend URL nothing answers at (the discard port)."""


def offline_config(path: Path, **options: Any) -> Config:
    """A configuration for a part built without servers: backends at :data:`NOWHERE`, stores
    never reached, unless ``options`` (:func:`refapi.lab.write_config`'s) say otherwise."""
    settings: dict[str, Any] = {
        "source_url": NOWHERE,
        "target_url": NOWHERE,
        "postgres_url": "postgresql://unused",
        "redis_url": "redis://unused",
        "redis_prefix": "x:",
    }
    return write_config(path, **{**settings, **options})


def cli_env(tmp_path: Path, postgres_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    """The environment of an SRE running `bascule` against these stores (no backend needed)."""
    config = tmp_path / "bascule.toml"
    offline_config(
        config, postgres_url=postgres_url, redis_url=redis_url, redis_prefix=redis_prefix
    )
    return {**os.environ, "BASCULE_CONFIG": str(config)}


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run `bascule ARGS` as a separate process, as an SRE would."""
    return subprocess.run(
        bascule_argv(*args), env=env, capture_output=True, text=True, timeout=60, check=False
    )
