"""The supervisor of ``bascule proxy --workers N`` (bascule/app/workers.py), over stand-in
workers: it forwards SIGTERM and exits 0 once they all stopped; it gives up, loudly and with
exit code 1, on a worker that keeps dying. (Real workers: tests/proxy/test_graceful.py.)"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

import pytest

from bascule.app import workers
from bascule.errors import ConfigError, UsageError
from bascule.tasks import spawn
from tests.harness import offline_config

# A worker that serves until SIGTERM, then exits 0 (as `bascule proxy` does once drained).
SERVES = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "print('worker up', flush=True)\n"
    "time.sleep(60)\n"
)


class StandIn(workers.Supervisor):
    def __init__(self, code: str, count: int) -> None:
        super().__init__(Path("unused.toml"), "127.0.0.1:0", "127.0.0.1:0", count, 5.0)
        self.code = code

    def argv(self) -> list[str]:
        return [sys.executable, "-c", self.code]


def alive(supervisor: workers.Supervisor) -> int:
    return sum(1 for s in supervisor.slots if s.proc is not None and s.proc.returncode is None)


async def test_sigterm_is_forwarded_and_the_parent_exits_0_once_workers_stopped() -> None:
    supervisor = StandIn(SERVES, 3)
    running = spawn(supervisor.run(), name="supervisor")
    while alive(supervisor) < 3:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # their SIGTERM handlers installed
    supervisor._signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        assert await running == 0
    assert [s.proc.returncode for s in supervisor.slots if s.proc] == [0, 0, 0]


async def test_a_crash_looping_worker_makes_the_parent_give_up_loudly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(workers, "RESTART_FIRST", 0.01)
    supervisor = StandIn("raise SystemExit(3)", 1)
    with caplog.at_level(logging.ERROR, "bascule.workers"):
        async with asyncio.timeout(30):
            assert await supervisor.run() == 1
    assert len(supervisor.slots[0].deaths) == workers.CRASH_LOOP
    assert "crash loop, giving up" in caplog.text
    assert "died (exit code 3): starting another" in caplog.text


def test_a_taken_port_is_refused_before_any_worker_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port} for the admin"):
            workers.reserve(f"127.0.0.1:{port}", "admin")
    sock, address = workers.reserve("127.0.0.1:0", "researcher")
    with sock:
        assert not address.endswith(":0")  # resolved once, for every worker to join


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("workers = 0", "proxy.workers"),
        ("workers = 65", "proxy.workers"),
        ("drain_seconds = 0", "proxy.drain_seconds"),
        ("drain_seconds = -1.0", "proxy.drain_seconds"),
    ],
)
def test_bad_worker_and_stop_settings_are_named(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        offline_config(tmp_path / "bascule.toml", proxy_extra=line)
    with pytest.raises(ConfigError, match=r"proxy\.prestop_seconds"):
        offline_config(tmp_path / "bascule.toml", prestop_seconds=-1.0)
    config = offline_config(tmp_path / "bascule.toml", proxy_extra="workers = 4")
    assert (config.proxy.workers, config.proxy.prestop_seconds) == (4, 0.0)
