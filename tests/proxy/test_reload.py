"""SIGHUP: a replica reloads its comparison rules, sampling and timeouts without dropping a
connection; a change that needs a restart is refused, naming its key, and the running
configuration stays."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from bascule.config import parse_config, reload_refusal
from bascule.stages import Stage
from refapi.lab import AUTH
from tests.conftest import Ground
from tests.harness import fetch, offline_config
from tests.world import RULES, build_world

RULE = 'ignore = ["/served_at"]'
WIDER = 'ignore = ["/served_at", "/record/amount"]'


def _variant(path: Path, old: str, new: str) -> str:
    text = path.read_text()
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("connect_timeout = 1.0", "connect_timeout = 3.0"),  # a backend's timeout
        ("[datasets.dcir]", "[datasets.dcir]\nshadow_sample = 0.5"),  # sampling
        ("[datasets.pmsi]", '[datasets.pmsi.compare]\nignore = ["/x"]'),  # comparison rules
        ("[shadow]\n", "[shadow]\ndeadline = 9.0\n"),
        ('kind = "read"\nkey = "id"', 'kind = "read"\nkey = "id"\nread_timeout = 30.0'),
        ("max_body_bytes = 1048576", "max_body_bytes = 1048576\nidle_timeout = 10.0"),
    ],
)
def test_what_a_reload_may_change(tmp_path: Path, old: str, new: str) -> None:
    path = tmp_path / "bascule.toml"
    running = offline_config(path)
    assert reload_refusal(running, parse_config(_variant(path, old, new))) is None


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("journal_sessions = 6", "journal_sessions = 7", "state.journal_sessions"),
        ('credential_env = "BASCULE_TEST_SERVICE_TOKEN"', 'credential_env = "X"', "backends"),
        ("max_body_bytes = 1048576", "max_body_bytes = 1", "proxy.max_body_bytes"),
        ("[datasets.cepidc]", "[datasets.cepidc]\n[datasets.other]", "datasets.other"),
        ('methods = ["DELETE"]', 'methods = ["DELETE", "POST"]', "routes[5].methods"),
        ("[shadow]\n", "[shadow]\nconcurrency = 2\n", "shadow.concurrency"),
    ],
)
def test_a_change_that_needs_a_restart_is_refused_naming_its_key(
    tmp_path: Path, old: str, new: str, key: str
) -> None:
    path = tmp_path / "bascule.toml"
    running = offline_config(path)
    refusal = reload_refusal(running, parse_config(_variant(path, old, new)))
    assert refusal is not None and refusal.startswith(key), refusal
    assert "changing it needs a restart" in refusal, refusal


async def _counts(state_db: str) -> dict[str, int]:
    """dcir's shadow-read outcomes counted so far, all replicas together."""
    rows = await fetch(
        state_db,
        "SELECT outcome, sum(n)::int AS n FROM bascule_shadow_count"
        " WHERE dataset = 'dcir' GROUP BY outcome",
    )
    return {r["outcome"]: r["n"] for r in rows}


async def _until(
    state_db: str, outcome: str, at_least: int, within: float = 30.0
) -> dict[str, int]:
    deadline = time.monotonic() + within
    while True:
        counts = await _counts(state_db)
        if counts.get(outcome, 0) >= at_least:
            return counts
        assert time.monotonic() < deadline, f"{outcome} never reached {at_least}: {counts}"
        await asyncio.sleep(0.2)


def _logged(log: Path, text: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"not logged: {text!r}"
        time.sleep(0.1)


async def test_sighup_with_a_new_ignore_rule_stops_counting_its_mismatch_without_dropping_a_connection(  # noqa: E501
    ground: Ground,
) -> None:
    """A ``bascule proxy`` process, its shadow reads in their worker process. A record differs
    on ``/record/amount``: each read of it is a mismatch. The rule ignoring it is added to the
    file and the process gets SIGHUP: reads of it now match, on the same kept-alive
    connection as before. Then a change needing a restart: refused, naming the key, and the
    rules in force stay."""
    async with build_world(
        ground,
        processes=True,
        shadow_worker=None,
        rules=RULES,
        stages=(Stage.DUALWRITE, Stage.SHADOW),
    ) as world:
        await world.sql(world.target_db, "UPDATE dcir SET amount = amount + 1 WHERE id = 5")
        log = ground.tmp_path / "proxy0.log"
        url = f"{world.proxy}/v1/datasets/dcir/records/5"
        opened: list[object] = []
        tracing = aiohttp.TraceConfig()

        async def on_open(*_: object) -> None:
            opened.append(_)

        tracing.on_connection_create_end.append(on_open)
        connector = aiohttp.TCPConnector(limit=1)  # one connection, kept alive throughout
        async with aiohttp.ClientSession(
            headers=AUTH, connector=connector, trace_configs=[tracing]
        ) as session:

            async def read() -> None:
                async with session.get(url) as resp:
                    assert resp.status == 200
                    await resp.read()

            await read()
            before = await _until(world.state_db, "mismatched", 1)

            world.config_path.write_text(_variant(world.config_path, RULE, WIDER))
            world.procs[0].signal(signal.SIGHUP)
            _logged(log, "configuration reloaded")
            assert "datasets.dcir.compare.ignore" in log.read_text()
            for _ in range(3):
                await read()
            after = await _until(world.state_db, "matched", before.get("matched", 0) + 3)
            assert after.get("mismatched", 0) == before["mismatched"], (before, after)

            # A key that needs a restart: refused, named; the running rules stay.
            world.config_path.write_text(
                _variant(world.config_path, "journal_sessions = 6", "journal_sessions = 9")
            )
            world.procs[0].signal(signal.SIGHUP)
            _logged(log, "state.journal_sessions: changing it needs a restart")
            await read()
            final = await _until(world.state_db, "matched", after["matched"] + 1)
            assert final.get("mismatched", 0) == before["mismatched"], (before, final)
            assert len(opened) == 1, opened  # one connection all along: none was dropped
