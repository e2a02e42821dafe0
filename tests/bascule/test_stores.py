"""The embedded stores start, answer on loopback TCP, and stop: checked on every run, whatever
the machine has, so the fresh-machine path never rots."""

from __future__ import annotations

import tempfile
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from bascule.state.servers import (
    EmbeddedPostgres,
    EmbeddedRedis,
    database_url,
    free_ports,
    port_answers,
    provide_stores,
    redact_url,
)


async def test_embedded_postgres_runs_sql_on_loopback_and_stops() -> None:
    root = Path(tempfile.mkdtemp(prefix="bt-emb-"))
    pg = EmbeddedPostgres(root)
    url = pg.start()
    try:
        assert url.startswith("postgresql://postgres@127.0.0.1:")
        conn = await asyncpg.connect(url)
        try:
            version = await conn.fetchval("SHOW server_version")
            assert int(version.split(".")[0]) >= 16
        finally:
            await conn.close()
    finally:
        pg.stop()
    assert not port_answers("127.0.0.1", pg.port)


async def test_embedded_redis_answers_and_stops() -> None:
    root = Path(tempfile.mkdtemp(prefix="bt-emb-"))
    rd = EmbeddedRedis(root)
    url = rd.start()
    try:
        client = aioredis.Redis.from_url(url)
        assert await client.set("k", "v")
        assert await client.get("k") == b"v"
        await client.aclose()
    finally:
        rd.stop()
    assert not port_answers("127.0.0.1", rd.port)


def test_environment_wins_over_config_and_local() -> None:
    env = {"BASCULE_POSTGRES_URL": "postgresql://a@h/db", "BASCULE_REDIS_URL": "redis://h:1/0"}
    with provide_stores("postgresql://cfg/db", "redis://cfg:2/0", env=env) as found:
        assert found.postgres_url == "postgresql://a@h/db"
        assert (found.postgres_origin, found.redis_origin) == ("environment", "environment")


def test_config_wins_over_local() -> None:
    with provide_stores("postgresql://cfg/db", "redis://cfg:2/0", env={}) as found:
        assert (found.postgres_origin, found.redis_origin) == ("config", "config")


def test_urls_are_redacted_and_retargeted() -> None:
    assert redact_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert database_url("postgresql://u@h:5432/postgres?x=1", "snds") == (
        "postgresql://u@h:5432/snds?x=1"
    )


def test_free_ports_are_distinct() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64
