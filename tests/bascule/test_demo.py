"""`bascule demo` tells the story end to end and exits 0, on ports its flags give and on a
Postgres of its own (it makes its databases on the state Postgres's server, where it refuses to
drop one it did not make); and what a newcomer hit before the story began."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from bascule.app.demo import MARK
from bascule.procs import bascule_argv
from bascule.state.servers import EmbeddedPostgres, database_url, free_ports

EXAMPLE = Path(__file__).parents[2] / "deploy" / "bascule.example.toml"


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[str]:
    """A Postgres server of the demo's own: it makes and drops whole databases."""
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="bt-demo-")))
    url = pg.start()
    try:
        yield url
    finally:
        pg.stop()


def demo(*args: str, postgres: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BASCULE_POSTGRES_URL": postgres}
    return subprocess.run(
        bascule_argv("demo", "--config", str(EXAMPLE), "--rows", "300", *args),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def port_flags() -> list[str]:
    ports = free_ports(4)
    flags = ("--port", "--admin-port", "--source-port", "--target-port")
    return [part for flag, port in zip(flags, ports, strict=True) for part in (flag, str(port))]


async def sql(url: str, statement: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(statement)
    finally:
        await conn.close()


def test_proxy_reads_bascule_config_like_every_command(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BASCULE_CONFIG"}
    done = subprocess.run(bascule_argv("proxy"), env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "pass --config FILE or set BASCULE_CONFIG" in done.stderr
    missing = tmp_path / "nowhere.toml"
    done = subprocess.run(
        bascule_argv("proxy"),
        env={**env, "BASCULE_CONFIG": str(missing)},
        capture_output=True,
        text=True,
    )
    # It was `the following arguments are required: --config`.
    assert done.returncode == 1 and f"{missing}: cannot read the file" in done.stderr


def test_a_taken_port_is_named_with_its_flag_before_anything_starts(own_postgres: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flags = port_flags()
        flags[flags.index("--admin-port") + 1] = str(port)
        done = demo(*flags, "--duration", "0", postgres=own_postgres, timeout=30)
    assert done.returncode == 2, done.stdout + done.stderr
    assert (
        f"port {port} on 127.0.0.1 (the admin port of the demo's proxy) is taken: pick a free "
        "one with --admin-port PORT" in done.stderr
    )
    assert "stopped cleanly" not in done.stdout and "Traceback" not in done.stderr
    names = asyncio.run(
        sql(own_postgres, "SELECT count(*) FROM pg_database WHERE datname LIKE 'snds%'")
    )
    assert names == 0  # nothing was made or dropped


def test_demo_runs_the_story_and_exits_cleanly(own_postgres: str) -> None:
    # A database the demo did not make is never dropped without --replace-databases.
    asyncio.run(sql(own_postgres, "CREATE DATABASE snds_target"))
    someone = database_url(own_postgres, "snds_target")
    asyncio.run(sql(someone, "CREATE TABLE kept AS SELECT 42 AS answer"))
    done = demo(*port_flags(), "--duration", "0", postgres=own_postgres, timeout=30)
    assert done.returncode == 2, done.stdout + done.stderr
    assert (
        "databases: the demo makes snds_source, snds_target, bascule_demo_state on" in done.stdout
    )
    assert (
        "snds_target already exist on postgresql://postgres@127.0.0.1:" in done.stderr
        and "were not made by the demo: left alone" in done.stderr
        and "--replace-databases" in done.stderr
    )
    assert "stopped cleanly" not in done.stdout
    assert asyncio.run(sql(someone, "SELECT answer FROM kept")) == 42

    done = demo(*port_flags(), "--duration", "0", "--replace-databases", postgres=own_postgres)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "dropping snds_target (--replace-databases)" in out
    for name in ("snds_source", "snds_target", "bascule_demo_state"):
        comment = (
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database"
            f" WHERE datname = '{name}'"
        )
        assert asyncio.run(sql(own_postgres, comment)) == MARK
    # Before: the target cloud is empty; after the backfill, dcir answers alike on both.
    before = out[out.index("before the migration") : out.index("the cutover, one dataset")]
    assert re.findall(r"│ (yes|no) +│", before) == ["no"] * 4
    assert "404 by scaleway" in before
    after = out[out.index("after the backfill") : out.index("2. shadow")]
    assert re.findall(r"│ (yes|no) +│", after) == ["yes"] * 3
    # The target's gap refuses `shadow` until a verification closes it: the backfill's. The
    # refusal the story expects is shown as such, short: its head, then one line per reason.
    assert "REFUSED  gaps: the target has had an open gap" in out
    assert "refused, as the story expects: dcir: cannot move dualwrite -> shadow\n" in out
    assert "      · the target has had an open gap since" in out
    assert "dcir: clean (run 1, full, in dualwrite: the target checked against the source" in out
    assert "the target's gap (open since" in out and "is closed (audited)" in out
    # In shadow, an amount changed straight in the target's database is found by comparing
    # researchers' reads, and shown as where and what kind, with a trace id, never the value;
    # the gate then refuses live, and a verification finds the record (a token) and repairs it.
    assert re.search(r"│ body +│ /record/amount +│ changed +│ 1 +│", out), out
    assert "refused, as the story expects: dcir: the gate refuses shadow -> live\n" in out
    assert re.search(r"      · mismatches: \d+ mismatches in the window", out)
    assert re.search(r"│ changed +│ [0-9a-f]{32} +│", out)
    assert "DIVERGENT, then repaired" in out and "1 written, 0 deleted" in out
    # With fresh evidence, the controller promotes dcir once its gate holds.
    assert "the gate is closed" in out and "(exit 3, as the story expects)" in out
    assert "the controller moved dcir to live: auto_promote: the gate holds" in out
    # Through the proxy, dcir moved to the target and back while pmsi stayed put.
    assert "dcir live: researchers calling" in out
    assert "served dcir by scaleway, pmsi by azure" in out
    assert "after rollback: researchers calling" in out
    # A researcher's write in live: answered by the target, replayed to the source.
    assert "(amount 123.45): scaleway holds 123.45, azure holds 123.45" in out, out
    # No raw log line breaks the story's layout (the switch's ids line was one), and no
    # refusal line runs on: each expected one fits on a line.
    assert not re.search(r"\d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR) ", out), out
    assert max(len(line) for line in out.splitlines() if "as the story expects" in line) < 110
    assert "stopped cleanly" in out
