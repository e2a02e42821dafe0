"""``bascule proxy --workers N``: N serving processes on one replica's ports, one parent.

The parent serves nothing and opens no store: it checks that it can bind both addresses,
starts N ``bascule proxy --worker-of PID`` processes, each binding the researcher and admin
ports with ``SO_REUSEPORT`` (the kernel spreads new connections over them), and supervises
them:

- a worker that dies (a crash, an OOM kill, SIGKILL) is started again after a backoff
  (``RESTART_FIRST`` doubling to ``RESTART_MAX``, back to the first once a worker has lived
  ``STABLE`` seconds); the requests it was serving are lost to their clients, its writes in
  flight are orphaned journal entries that the resolver settles (``proxy/resolver.py``);
- a worker that died ``CRASH_LOOP`` times within ``CRASH_WINDOW`` seconds makes the parent give
  up loudly: it stops the other workers and exits 1, for the service manager to act on (a
  crash loop is a configuration or environment fault; restarting forever hides it);
- SIGTERM and SIGINT are forwarded to every worker, which stops gracefully
  (``bascule/app/replica.py``: not ready, pre-stop window, drain); the parent waits for them
  (a worker still there after the pre-stop window, the drain and ``STOP_MARGIN`` is killed)
  and exits 0 when they all did; SIGHUP is forwarded as is.

Each worker is a replica of its own (its name, sessions, leases and report in
``bascule status``); its shadow worker process is its own child and ends with it (the link's
socket closes). Workers get SIGTERM from the kernel if the parent dies however it dies
(``PR_SET_PDEATHSIG``), so none outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from bascule.config import load_config
from bascule.errors import UsageError
from bascule.procs import _die_with_parent, bascule_argv
from bascule.tasks import spawn

log = logging.getLogger("bascule.workers")

RESTART_FIRST = 0.5
RESTART_MAX = 30.0
STABLE = 60.0
"""Seconds a worker must live for its next death to start the backoff over."""
CRASH_LOOP = 5
CRASH_WINDOW = 60.0
"""A worker slot that died ``CRASH_LOOP`` times within ``CRASH_WINDOW`` seconds: give up."""
STOP_MARGIN = 10.0
"""Seconds past pre-stop + drain a worker has to exit after SIGTERM before it is killed."""


@dataclass
class Slot:
    """One worker's place: the process in it now, and when its predecessors died."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    deaths: deque[float] = field(default_factory=deque)
    delay: float = RESTART_FIRST


def reserve(address: str, what: str) -> tuple[socket.socket, str]:
    """Bind ``address`` with ``SO_REUSEPORT`` without listening: the port is checked free
    (a clear error now rather than N crash-looping workers), held for the workers to join
    (port 0 is resolved here, once for all) and never accepts a connection itself."""
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot listen on {address} for the {what} port: {exc}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"cannot listen on {address} for the {what} port: {exc.strerror}"
        ) from None
    bound = sock.getsockname()[1]
    return sock, f"{host}:{bound}"


def supervise(config_path: Path, listen: str, admin_listen: str, workers: int) -> int:
    """Run ``workers`` workers until stopped; the exit code (0 stopped, 1 gave up)."""
    config = load_config(config_path)
    held = []
    try:
        for address, what in ((listen, "researcher"), (admin_listen, "admin")):
            sock, resolved = reserve(address, what)
            held.append(sock)
            if what == "researcher":
                listen = resolved
            else:
                admin_listen = resolved
        stop_within = config.proxy.prestop_seconds + config.proxy.drain_seconds + STOP_MARGIN
        supervisor = Supervisor(config_path, listen, admin_listen, workers, stop_within)
        return asyncio.run(supervisor.run())
    finally:
        for sock in held:
            sock.close()


class Supervisor:
    def __init__(
        self, config_path: Path, listen: str, admin_listen: str, workers: int, stop_within: float
    ) -> None:
        self.config_path = config_path
        self.listen = listen
        self.admin_listen = admin_listen
        self.slots = [Slot(i, delay=RESTART_FIRST) for i in range(workers)]
        self.stop_within = stop_within
        self.stopping: signal.Signals | None = None
        self.gave_up = False
        self._wake = asyncio.Event()

    def argv(self) -> list[str]:
        return bascule_argv(
            "--log-level",
            logging.getLevelName(logging.getLogger().getEffectiveLevel()),
            "proxy",
            "--config",
            str(self.config_path),
            "--listen",
            self.listen,
            "--admin-listen",
            self.admin_listen,
            "--worker-of",
            str(os.getpid()),
        )

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._signal, sig)
        log.info(
            "supervising %d workers on %s (admin %s)",
            len(self.slots),
            self.listen,
            self.admin_listen,
        )
        watchers = [spawn(self._keep(slot), name=f"worker-{slot.index}") for slot in self.slots]
        await asyncio.gather(*watchers)
        if self.gave_up:
            return 1
        codes = [slot.proc.returncode if slot.proc else 0 for slot in self.slots]
        log.info("workers stopped (exit codes %s)", codes)
        return 0 if all(code == 0 for code in codes) else 1

    def _signal(self, sig: signal.Signals) -> None:
        if sig is signal.SIGHUP:
            self._send(sig)
            return
        if self.stopping is None:
            log.info("%s: stopping %d workers", sig.name, len(self.slots))
        self.stopping = sig
        self._send(sig)
        self._wake.set()

    def _send(self, sig: signal.Signals) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    async def _start(self, slot: Slot) -> None:
        slot.proc = await asyncio.create_subprocess_exec(
            *self.argv(),
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        slot.started = time.monotonic()
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    async def _keep(self, slot: Slot) -> None:
        """Keep a worker in ``slot`` until stopping; then wait for the last one to exit."""
        while self.stopping is None and not self.gave_up:
            await self._start(slot)
            assert slot.proc is not None
            if self.stopping is not None or self.gave_up:  # a signal came while it started
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(self.stopping or signal.SIGTERM)
            code = await slot.proc.wait()
            if self.stopping is not None or self.gave_up:
                break
            now = time.monotonic()
            if now - slot.started > STABLE:
                slot.delay = RESTART_FIRST
            slot.deaths.append(now)
            while slot.deaths and now - slot.deaths[0] > CRASH_WINDOW:
                slot.deaths.popleft()
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            if len(slot.deaths) >= CRASH_LOOP:
                log.critical(
                    "worker %d died %d times within %.0f s (last: %s): crash loop, giving "
                    "up; stopping the other workers and exiting 1",
                    slot.index,
                    len(slot.deaths),
                    CRASH_WINDOW,
                    how,
                )
                self.gave_up = True
                self._send(signal.SIGTERM)
                self._wake.set()
                break
            log.error(
                "worker %d (pid %d) died (%s): starting another in %.1f s",
                slot.index,
                slot.proc.pid,
                how,
                slot.delay,
            )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(slot.delay):
                    await self._wake.wait()
            slot.delay = min(slot.delay * 2, RESTART_MAX)
        await self._reap(slot)

    async def _reap(self, slot: Slot) -> None:
        """The worker in ``slot`` has exited, or is made to within ``stop_within``."""
        proc = slot.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            async with asyncio.timeout(self.stop_within):
                await proc.wait()
        except TimeoutError:
            log.error("worker %d (pid %d) still running: killed", slot.index, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
