"""Shared test helpers: backends on loopback, a config file for them, a migrated state store."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp import web

from bascule.config import Config, load_config
from bascule.procs import ServerProcess, bascule_argv
from bascule.state import schema
from bascule.state.postgres import open_pool
from bascule.state.servers import free_port, free_ports
from bascule.state.stage_store import StageStore
from proxy.server import Server
from refapi.app import create_app

RESEARCHER_TOKEN = "researcher-token-0123456789"
SERVICE_TOKEN = "service-token-0123456789abcdef"
OPERATOR_TOKEN = "operator-token-0123456789"
VIEWER_TOKEN = "viewer-token-0123456789"
DATASETS = ("default", "dcir", "pmsi", "cepidc")
TEST_POOL = 6
"""Connections per reference API, and journal sessions per proxy, in tests: two workers each
running a two-proxy fleet stay under the server's 100 connections."""
AUTH = {"Authorization": f"Bearer {RESEARCHER_TOKEN}"}
JOURNAL_KEY = "11" * 32
HMAC_KEY = "22" * 32
# What a proxy process in the tests is started with: the journal keys and the service token.
PROXY_ENV = {
    "BASCULE_JOURNAL_KEY": JOURNAL_KEY,
    "BASCULE_HMAC_KEY": HMAC_KEY,
    "BASCULE_TEST_SERVICE_TOKEN": SERVICE_TOKEN,
}


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


Finish = Callable[[web.Request, web.Response], web.Response]


@asynccontextmanager
async def relay(
    backend: str, finish: Finish = lambda request, answer: answer
) -> AsyncIterator[str]:
    """An HTTP relay in front of ``backend``: every request is forwarded (so the backend
    commits it) and ``finish`` decides what the client gets instead of the backend's answer —
    a fault injector (a 504 after the commit, a gzipped answer...)."""

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with aiohttp.ClientSession() as session:
            async with session.request(
                request.method, backend + request.path_qs, data=body, headers=headers
            ) as resp:
                answer = web.Response(
                    status=resp.status, body=await resp.read(), content_type=resp.content_type
                )
                for name in ("Idempotency-Replayed", "X-Served-By"):
                    if name in resp.headers:
                        answer.headers[name] = resp.headers[name]
        return finish(request, answer)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    async with serve_app(app) as url:
        yield url


@asynccontextmanager
async def serve_proxy(server: Server) -> AsyncIterator[str]:
    """Run bascule's researcher-facing server on a loopback port; yield its base URL."""
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.close(grace=1.0)


@asynccontextmanager
async def refapi(name: str, database_url: str, **kwargs: bool) -> AsyncIterator[str]:
    """A reference API instance named ``name`` over ``database_url``; yields its URL."""
    app = create_app(
        name, database_url, [RESEARCHER_TOKEN, SERVICE_TOKEN], pool_size=TEST_POOL, **kwargs
    )
    async with serve_app(app) as url:
        yield url


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
        **kwargs: bool,
    ) -> None:
        self.name = name
        self.database_url = database_url
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.shutdown_timeout = shutdown_timeout
        self.kwargs = kwargs
        self._runner: web.AppRunner | None = None

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
            pool_size=TEST_POOL,
            **self.kwargs,
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.shutdown_timeout)
        await runner.setup()
        deadline = asyncio.get_running_loop().time() + 5.0
        while True:
            try:
                await web.TCPSite(runner, "127.0.0.1", self.port).start()
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


def write_config(
    path: Path,
    *,
    source_url: str,
    target_url: str,
    postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    poll_interval: float = 0.5,
    stale_after: float = 30.0,
    orphan_grace: float = 5.0,
    read_timeout: float = 5.0,
    max_body_bytes: int = 1024 * 1024,
    idempotent_creates: bool = False,
    databases: tuple[str, str] | None = None,
    extra: str = "",
    shadow_worker: str | None = "inline",
) -> Config:
    """A proxy config over the two backends. ``idempotent_creates``: the create route declares
    ``idempotent_backend`` (the backend honours Idempotency-Key there). ``databases``: the
    (source, target) databases of the reference APIs, so an authority switch moves dcir's id
    sequence past the other side's ids. ``shadow_worker``: ``[shadow] worker`` — ``inline`` by
    default, so that tests see inside the dispatcher and a replica costs no second process;
    the worker process has tests of its own (tests/shadow/test_worker.py); None: the
    product's default."""
    source_db, target_db = databases or (None, None)
    if shadow_worker is not None:
        line = f'worker = "{shadow_worker}"\n'
        extra = (
            extra.replace("[shadow]\n", "[shadow]\n" + line, 1)
            if "[shadow]\n" in extra
            else f"{extra}\n[shadow]\n{line}"
        )
    db_line = 'database = "{}"'
    ids = 'ids = { table = "dcir", sequence = "dcir_id_seq" }' if databases else ""
    listen, admin = free_ports(2)
    path.write_text(
        f"""
[proxy]
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
max_body_bytes = {max_body_bytes}

[state]
postgres_url = "{postgres_url}"
redis_url = "{redis_url}"
redis_prefix = "{redis_prefix}"
poll_interval = {poll_interval}
stale_after = {stale_after}
orphan_grace = {orphan_grace}
journal_sessions = {TEST_POOL}

[migration]
source = "azure"
target = "scaleway"

[backends.azure]
url = "{source_url}"
connect_timeout = 1.0
read_timeout = {read_timeout}
credential_env = "BASCULE_TEST_SERVICE_TOKEN"
{db_line.format(source_db) if source_db else ""}

[backends.scaleway]
url = "{target_url}"
connect_timeout = 1.0
read_timeout = {read_timeout}
credential_env = "BASCULE_TEST_SERVICE_TOKEN"
{db_line.format(target_db) if target_db else ""}

[datasets.default]
[datasets.dcir]
{ids}
[datasets.pmsi]
[datasets.cepidc]

[[routes]]
path = "/v1/datasets"
methods = ["GET"]
kind = "read"
dataset = "default"

[[routes]]
path = "/v1/datasets/{{dataset}}/records"
methods = ["GET"]
kind = "read"

[[routes]]
path = "/v1/datasets/{{dataset}}/records"
methods = ["POST"]
kind = "write"
create_id = "/record/id"
replay_as = "PUT /v1/datasets/{{dataset}}/records/{{id}}"
idempotent_backend = {str(idempotent_creates).lower()}

[[routes]]
path = "/v1/datasets/{{dataset}}/records/{{id}}"
methods = ["GET"]
kind = "read"
key = "id"
key_format = "integer"

[[routes]]
path = "/v1/datasets/{{dataset}}/records/{{id}}"
methods = ["PUT", "PATCH"]
kind = "write"
key = "id"
key_format = "integer"
replay_as = "PUT /v1/datasets/{{dataset}}/records/{{id}}"

[[routes]]
path = "/v1/datasets/{{dataset}}/records/{{id}}"
methods = ["DELETE"]
kind = "write"
key = "id"
key_format = "integer"

[[routes]]
path = "/v1/datasets/{{dataset}}/query"
methods = ["POST"]
kind = "read"
{extra}
"""
    )
    return load_config(path)


async def migrate_state(postgres_url: str, datasets: Sequence[str] = DATASETS) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        await schema.migrate(conn)
    finally:
        await conn.close()
    pool = await open_pool(postgres_url, max_size=1)
    try:
        await StageStore(pool).register(datasets, actor="test")
    finally:
        await pool.close()


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
    stack: AsyncExitStack, config: Path, log: Path, env: dict[str, str]
) -> ProxyProcess:
    """Start `bascule proxy` on free ports, ready; it is stopped when ``stack`` closes."""
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
        ),
        health_url=f"http://127.0.0.1:{admin}/readyz",
        log_path=log,
        env=env,
    )
    stack.push_async_callback(proc.stop)
    await proc.start()
    return ProxyProcess(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}")


def cli_env(tmp_path: Path, postgres_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    """The environment of an SRE running `bascule` against these stores (no backend needed)."""
    config = tmp_path / "bascule.toml"
    write_config(
        config,
        source_url="http://127.0.0.1:9",
        target_url="http://127.0.0.1:9",
        postgres_url=postgres_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
    )
    return {**os.environ, "BASCULE_CONFIG": str(config)}


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run `bascule ARGS` as a separate process, as an SRE would."""
    return subprocess.run(
        bascule_argv(*args), env=env, capture_output=True, text=True, timeout=60, check=False
    )
