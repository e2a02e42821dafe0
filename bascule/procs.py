"""Child processes that serve HTTP: started, waited for until healthy, stopped cleanly.

Used by the demo, the benchmarks and the tests that need real processes (several proxy replicas,
the reference API), so they all start and stop servers the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bascule.errors import ProcessFailed


@dataclass
class ServerProcess:
    name: str
    argv: Sequence[str]
    health_url: str
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None
    stop_signal: signal.Signals = signal.SIGTERM
    """What :meth:`stop` sends first (SIGINT stops a `bascule proxy` without its pre-stop
    window, for a demo that has no load balancer to warn)."""

    async def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ, **self.env}
        log = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop them
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        await self.wait_healthy(timeout)

    async def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.returncode is not None:
                    raise ProcessFailed(
                        f"{self.name} exited with {self.proc.returncode} during start-up:\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(
                        self.health_url, timeout=aiohttp.ClientTimeout(total=1)
                    ) as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise ProcessFailed(f"{self.name} not healthy after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, timeout: float = 10.0) -> int | None:
        """``stop_signal`` (SIGTERM), then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.signal(self.stop_signal)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.proc.wait()
        return self.proc.returncode


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the parent dies, however it dies
    (a benchmark killed by `timeout`, a test runner killed by CI), so no server outlives it."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def bascule_argv(*args: str) -> list[str]:
    """The argv that runs ``bascule ARGS`` with this interpreter."""
    return [sys.executable, "-m", "bascule", *args]
