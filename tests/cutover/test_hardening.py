"""Hardening found by a red-team review: stage propagation, the admin API and the CLI on a bad day.

Each test was written failing, as the reproduction of a defect, before its fix.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from bascule.app.admin import AdminDeps, create_admin_app
from bascule.app.operations import Operations
from bascule.procs import bascule_argv
from bascule.stages import Stage
from bascule.state.fleet import RedisAnnouncer, StageView
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageStore
from refapi.lab import DATASETS, OPERATOR_TOKEN, VIEWER_TOKEN, migrate_state, walk
from tests.harness import cli_env, serve_app

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]
OP = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


def _as_role(url: str, role: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))


@pytest.fixture
async def limited_role(pg_url: str) -> AsyncIterator[str]:
    """A login role on the test database (so the test can refuse it connections); yields its URL."""
    await migrate_state(pg_url)
    role = f"rt_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pg_url)
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    await conn.execute(f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}")
    await conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    try:
        yield role
    finally:
        await conn.execute(f"REASSIGN OWNED BY {role} TO postgres; DROP OWNED BY {role}")
        await conn.execute(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        )
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()


async def _flip(store: StageStore, announcer: RedisAnnouncer, dataset: str, to: Stage) -> None:
    await announcer.announce(await walk(store, dataset, to, actor="rt"))


async def test_one_too_many_connections_error_does_not_stop_propagation_forever(
    pg_url: str, redis_url: str, redis_prefix: str, limited_role: str
) -> None:
    """Postgres at max_connections answers 'too many connections' (SQLSTATE 53300) -- a very
    ordinary bad-day error. asyncpg raises TooManyConnectionsError, which is not in
    bascule.state.postgres.UNREACHABLE, so StageView.reload() lets it escape: the poll task
    dies, and the listen task dies on the next Redis message. The replica then serves its old
    stages forever while /readyz keeps saying ready."""
    admin_pool = await open_pool(pg_url, max_size=2)
    redis = aioredis.Redis.from_url(redis_url)
    announcer = RedisAnnouncer(redis, redis_prefix)
    admin_store = StageStore(admin_pool)
    su = await asyncpg.connect(pg_url)

    pool = await open_pool(_as_role(pg_url, limited_role))
    view = StageView(StageStore(pool), redis_url, redis_prefix, 0.2, DATASETS)
    await view.start()
    try:
        assert view.get("dcir").stage is Stage.SOURCE  # type: ignore[union-attr]
        # -- 2 s in which Postgres refuses this replica new connections -------------------
        await su.execute(f"ALTER ROLE {limited_role} CONNECTION LIMIT 0")
        await pool.expire_connections()
        await asyncio.sleep(0.6)
        await _flip(admin_store, announcer, "dcir", Stage.DUALWRITE)  # a message arrives now
        await asyncio.sleep(1.4)
        await su.execute(f"ALTER ROLE {limited_role} CONNECTION LIMIT -1")
        # -- Postgres is fine again; an SRE flips dcir once more --------------------------
        await _flip(admin_store, announcer, "dcir", Stage.SHADOW)
        for _ in range(30):  # 3 s = 15 poll intervals
            row = view.get("dcir")
            if row is not None and row.stage is Stage.SHADOW:
                break
            await asyncio.sleep(0.1)
        dead = [t.get_name() for t in view._tasks if t.done()]
        detail = view.detail()
        assert view.get("dcir").stage is Stage.SHADOW, (  # type: ignore[union-attr]
            f"replica stuck at {detail['stages']['dcir']!r} after the outage ended; "
            f"dead tasks: {dead}; /readyz ready={detail['ready']}"
        )
    finally:
        await view.stop()
        await pool.close()
        await su.close()
        await redis.aclose()
        await admin_pool.close()


# --- a replica cut off from Postgres stays "ready" forever -------------------------------------


class Cuttable:
    """A TCP forwarder to Postgres whose link can be cut (every connection dropped, new ones
    refused by closing them at once) and restored."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cut = False
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return
        self.writers += [writer, up_w]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def sever(self) -> None:
        self.cut = True
        for w in self.writers:
            w.close()
        self.writers.clear()

    async def close(self) -> None:
        self.sever()
        self.server.close()
        await self.server.wait_closed()
        await asyncio.sleep(0.1)


async def test_a_replica_partitioned_from_postgres_stops_being_ready(
    pg_url: str, redis_url: str, redis_prefix: str
) -> None:
    """The design: a replica cut off from the stores keeps serving on its last known stages *for a
    bounded time* ... *and then reports not ready*. StageView.ready ignores store health, so a
    replica partitioned from Postgres (Redis fine) stays in the load balancer forever, serving
    -- and routing writes by -- stages the rest of the fleet has long left."""
    await migrate_state(pg_url)
    parts = urlsplit(pg_url)
    link = Cuttable(parts.port or 5432)
    port = await link.start()
    pool = await open_pool(urlunsplit(parts._replace(netloc=f"postgres@127.0.0.1:{port}")))
    view = StageView(StageStore(pool), redis_url, redis_prefix, 0.1, DATASETS, stale_after=2.0)
    await view.start()
    admin_pool = await open_pool(pg_url, max_size=1)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        link.sever()
        for to in (Stage.DUALWRITE, Stage.SHADOW, Stage.LIVE):
            await _flip(StageStore(admin_pool), RedisAnnouncer(redis, redis_prefix), "dcir", to)
        await asyncio.sleep(5)  # 50 poll intervals
        detail = view.detail()
        assert not detail["ready"], (
            f"still ready after 5 s cut off: serves dcir={detail['stages']['dcir']} while the "
            "fleet is at live"
        )
    finally:
        await view.stop()
        await link.close()
        await pool.close()
        await admin_pool.close()
        await redis.aclose()


# --- admin API: error paths --------------------------------------------------------------------


@pytest.fixture
async def admin_url(pg_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[str]:
    await migrate_state(pg_url)
    pool = await open_pool(pg_url)
    redis = aioredis.Redis.from_url(redis_url)
    deps = AdminDeps(
        Operations(
            StageStore(pool),
            RedisAnnouncer(redis, redis_prefix),
        ),
        None,
        {"operator": OPERATOR_TOKEN},
        VIEWER_TOKEN,
    )
    async with serve_app(create_admin_app(deps)) as url:
        yield url
    await redis.aclose()
    await pool.close()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/datasets/dcir/stage", {"stage": "dualwrite", "reason": "bad\u0000reason"}),
        ("/v1/datasets/dcir/stage", {"stage": "dualwrite", "reason": "r", "by": "a\u0000b"}),
        ("/v1/datasets/dc%00ir/stage", {"stage": "dualwrite", "reason": "r"}),
    ],
)
async def test_bad_input_is_a_4xx_not_a_500(admin_url: str, path: str, body: dict) -> None:  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as session:
        async with session.post(admin_url + path, headers=OP, data=orjson.dumps(body)) as resp:
            text = await resp.text()
            assert resp.status < 500, (resp.status, text[:120])


async def test_history_with_nul_in_the_dataset_is_a_4xx(admin_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(
            admin_url + "/v1/history?dataset=%00",
            headers={"Authorization": f"Bearer {VIEWER_TOKEN}"},
        ) as resp:
            assert resp.status < 500, (resp.status, (await resp.text())[:120])


async def test_actor_in_the_audit_is_not_whatever_the_caller_claims(admin_url: str) -> None:
    """One shared operator token, and 'by' taken from the JSON body: the audit's 'who' is
    self-declared."""
    async with aiohttp.ClientSession() as session:
        async with session.post(
            admin_url + "/v1/datasets/dcir/stage",
            headers=OP,
            data=orjson.dumps({"stage": "dualwrite", "reason": "r", "by": "the-ciso"}),
        ) as resp:
            assert resp.status == 200
        async with session.get(admin_url + "/v1/history?dataset=dcir", headers=OP) as resp:
            actor = (await resp.json())["history"][-1]["actor"]
    assert actor != "the-ciso", "audit row attributes the change to a name the caller typed"


# --- CLI: the audit's free text breaks the tables ---------------------------------------------


def test_cli_history_survives_any_reason_text(
    tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str
) -> None:
    env = cli_env(tmp_path, pg_url, redis_url, redis_prefix)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            bascule_argv(*args), env=env, capture_output=True, text=True, timeout=60, check=False
        )

    assert run("migrate").returncode == 0
    done = run("stage", "dcir", "dualwrite", "--reason", "incident [/link] follow-up")
    assert done.returncode == 0, done.stderr
    for cmd in (("history",), ("status",)):
        done = run(*cmd)
        assert done.returncode == 0, (cmd, done.stderr[-400:])


async def test_non_ascii_bearer_token_is_401_not_500(admin_url: str) -> None:
    host, port = admin_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
        b"Connection: close\r\n\r\n"
    )
    async with asyncio.timeout(5):
        data = await reader.read()
    writer.close()
    assert data.split(b" ", 2)[1] == b"401", data[:80]


async def test_a_deleted_stage_row_is_an_alarm_not_a_cached_stage(
    pg_url: str, redis_url: str, redis_prefix: str
) -> None:
    """The design: a stage missing from every store is an alarm. StageView.reload() only ever adds
    or advances rows, so a row that disappears (or is re-registered at version 1) is served from
    the cache forever, and /readyz does not notice."""
    await migrate_state(pg_url)
    pool = await open_pool(pg_url)
    view = StageView(StageStore(pool), redis_url, redis_prefix, 0.1, DATASETS)
    await view.start()
    try:
        await pool.execute("DELETE FROM bascule_stage WHERE dataset = 'dcir'")
        await asyncio.sleep(0.5)
        assert view.get("dcir") is None or not view.ready, (view.get("dcir"), view.detail())
    finally:
        await view.stop()
        await pool.close()
