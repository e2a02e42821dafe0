"""``bascule api``: the real process serves and stops cleanly; bad set-ups are refused clearly."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

import aiohttp
import asyncpg
import pytest

from bascule.errors import ConfigError, UsageError
from bascule.state.servers import free_port
from refapi import cli
from tests.refapi.conftest import RESEARCHER, SERVICE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bascule")
    cli.register(parser.add_subparsers(dest="command"))
    return parser


async def test_the_real_process_serves_and_stops_on_sigterm(pg_url: str) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bascule",
        "api",
        "--name",
        "proc-api",
        "--database",
        pg_url,
        "--port",
        str(port),
        env={**os.environ, "BASCULE_API_TOKENS": f"{RESEARCHER},{SERVICE}"},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 20
            while True:
                assert proc.returncode is None, "the API exited during start-up"
                try:
                    async with session.get(f"{base}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "no /healthz within 20 s"
                await asyncio.sleep(0.1)
            headers = {"Authorization": f"Bearer {RESEARCHER}"}
            async with session.get(f"{base}/v1/datasets", headers=headers) as resp:
                assert resp.status == 200
                assert resp.headers["X-Served-By"] == "proc-api"
                assert len((await resp.json())["datasets"]) == 3
            async with session.get(f"{base}/v1/datasets") as resp:
                assert resp.status == 401
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, output.decode()
    log = output.decode()
    assert "listening on" in log and "stopping" in log
    assert "GET /v1/datasets 200" in log and "GET /v1/datasets 401" in log
    # The app created its tables on start-up.
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('dcir') IS NOT NULL")
    finally:
        await conn.close()


def test_no_tokens_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASCULE_API_TOKENS", " , ")
    args = _parser().parse_args(
        ["api", "--name", "x", "--database", "postgresql://nowhere/db", "--port", "1"]
    )
    with pytest.raises(ConfigError, match="BASCULE_API_TOKENS") as caught:
        args.func(args)
    assert "comma-separated" in str(caught.value)


def test_serving_needs_name_database_and_port(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["api", "--name", "x"])
    with pytest.raises(SystemExit) as caught:
        args.func(args)
    assert caught.value.code == 2
    assert "--database, --port" in capsys.readouterr().err


def test_seed_command_fills_the_database(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["api", "seed", "--database", pg_url, "--rows", "25", "--seed", "3"]
    args = _parser().parse_args([*argv, "--datasets", "dcir,cepidc"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "dcir: 25 rows" in out and "cepidc: 25 rows" in out and "pmsi" not in out
    bad = _parser().parse_args([*argv, "--datasets", "dcir,sniiram"])
    with pytest.raises(UsageError, match="sniiram"):
        bad.func(bad)
