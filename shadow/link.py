"""The proxy's end of its shadow worker process: the researcher's path hands shadow reads over.

With ``[shadow] worker = "process"`` (the default) a replica's shadow reads run in a process of
their own (:mod:`shadow.worker`) at a lower CPU priority (``[shadow] priority``): their
requests, comparisons of answers of several megabytes and journal look-ups never hold the
event loop researchers are served from, and on a busy machine they take only the CPU the
researchers leave. The researcher's path here does what it did with an inline dispatcher —
sample, note ``t0``, keep the answer — and :meth:`ShadowLink.submit` writes the job to a socket
without waiting.

Every shadow read is counted once, here (:mod:`shadow.tally`):
- a job that does not fit (the link's buffer holds ``4 x max_body_bytes`` at most, as the
  worker's own budget does) or that comes while no worker is ready is counted ``dropped``;
- the worker's reports carry the jobs it has done together with their outcomes, applied here
  in one step; when it dies, the jobs it had not reported are counted ``dropped``, and another
  is started (backing off from 0.5 s to 30 s).
The tally is written to the ledger about once a second: counts to Redis, errored comparisons
and mismatches to Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import sys
import time
from collections import Counter
from typing import Any

import msgspec

from bascule.config import Config, Secrets
from bascule.tasks import spawn
from shadow.dispatch import DbClock, Job, Sampling
from shadow.ledger import Ledger, Outcome
from shadow.tally import Tally
from shadow.wire import (
    Hello,
    Join,
    Joined,
    Ready,
    Reload,
    Report,
    frame,
    job_frame,
    read_to_proxy,
)

log = logging.getLogger("bascule.shadow")

RESTART_FIRST, RESTART_MAX = 0.5, 30.0
READY_WAIT = 60.0
"""Seconds a new worker has to open its stores, read the clock and say it is ready."""
START_WAIT = 10.0
"""Seconds :meth:`ShadowLink.start` waits for the first worker: the proxy serves either way
(reads shadowed meanwhile are counted ``dropped``)."""
SILENT_WAIT = 60.0
"""Seconds without a frame (the worker reports at least every second) before a worker is
taken for wedged: killed, its jobs counted ``dropped``, and another started."""
STOP_WAIT = 15.0
"""Seconds a stopping worker has to count what it holds and report it, before it is killed."""


class ShadowLink(Sampling):
    """Runs a replica's shadow reads in a worker process; the researcher's side of it. While
    no worker is ready, :meth:`wanted` still says yes and :meth:`room` says there is none: the
    read is counted ``dropped``, so that a gap in shadowing shows in the ledger."""

    def __init__(
        self,
        config: Config,
        secrets: Secrets,
        postgres_url: str,
        redis_url: str,
        replica: str,
        ledger: Ledger,
        clock_pool: Any,
        *,
        rng: random.Random | None = None,
    ) -> None:
        """``ledger``: where this replica's shadow reads are counted. ``clock_pool``: the
        state database, for the clock ``t0`` is read from (:class:`DbClock`)."""
        self.config = config
        self.settings = config.shadow
        self.ledger = ledger
        self.clock = DbClock()
        self.clock_pool = clock_pool
        self.rng = rng or random.Random()
        self.budget = 4 * self.settings.max_body_bytes
        self.tally = Tally()
        self._hello = Hello(config, secrets, postgres_url, redis_url, replica)
        self._inflight: dict[int, tuple[str, str, int]] = {}
        """Jobs sent and not yet reported done: (dataset, route) by number."""
        self._seq = 0
        self._joins: dict[int, asyncio.Future[None]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None
        """The ready worker's process id (None while there is none)."""
        self.restarts = 0

    @property
    def unreported(self) -> int:
        """Jobs sent to the worker and not yet reported done."""
        return len(self._inflight)

    # -- the researcher's path -------------------------------------------------------------

    def room(self) -> int:
        """Bytes a new shadow read may hold now: what the link's buffer has left."""
        writer = self._open_writer()
        if writer is None:
            return 0
        return max(0, self.budget - writer.transport.get_write_buffer_size())

    def submit(self, job: Job) -> None:
        """Hand a job to the worker; never waits, never raises. No room, or no worker:
        dropped, counted."""
        writer = self._open_writer()
        if writer is None:
            return self.count(job.dataset, job.route, "dropped", job.version)
        self._seq += 1
        try:
            data = frame(job_frame(job, self._seq))
        except (TypeError, ValueError) as exc:
            log.error("shadow read of %s %s not sent: %s", job.dataset, job.route, type(exc))
            return self.count(job.dataset, job.route, "dropped", job.version)
        if writer.transport.get_write_buffer_size() + len(data) > self.budget:
            return self.count(job.dataset, job.route, "dropped", job.version)
        try:
            writer.write(data)
        except (RuntimeError, OSError):  # the link closed under us: the supervisor sees it
            return self.count(job.dataset, job.route, "dropped", job.version)
        self._inflight[self._seq] = (job.dataset, job.route, job.version)

    def count(self, dataset: str, route: str, outcome: Outcome, version: int) -> None:
        self.tally.count(dataset, route, outcome, version)

    def _open_writer(self) -> asyncio.StreamWriter | None:
        writer = self._writer
        if writer is None or self._stopping.is_set() or not self._ready.is_set():
            return None
        return None if writer.is_closing() else writer

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Measure the clock, start the worker and wait (bounded) for it to be ready: a
        worker that cannot start is logged and retried, and the proxy serves meanwhile."""
        await self.calibrate()
        self._tasks = [
            spawn(self._supervise(), name="shadow-link"),
            spawn(self._housekeeping(), name="shadow-link-housekeeping"),
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_WAIT):
                await self._ready.wait()

    async def reconfigure(self, config: Config) -> None:
        """A reload (SIGHUP): sampling here, and the worker told (one frame, before any job
        sent after it); a worker started later gets it in its hello."""
        self.config = config
        self.settings = config.shadow
        self._hello = msgspec.structs.replace(self._hello, config=config)
        writer = self._open_writer()
        if writer is not None:
            with contextlib.suppress(RuntimeError, OSError):
                writer.write(frame(Reload(config)))

    async def join(self) -> None:
        """Until every job sent so far is done and counted, and the tally flushed."""
        writer = self._open_writer()
        if writer is not None:
            self._seq += 1
            waiter = asyncio.get_running_loop().create_future()
            self._joins[self._seq] = waiter
            try:
                writer.write(frame(Join(self._seq)))
            except (RuntimeError, OSError):
                self._joins.pop(self._seq, None)
            else:
                await waiter
        await self.flush()

    async def stop(self) -> None:
        """The worker told to stop (the end of its socket): it counts what it holds dropped,
        reports and exits; one still starting is killed, holding nothing."""
        self._stopping.set()
        writer = self._writer if self._ready.is_set() else None
        self._ready.clear()
        if writer is not None and not writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()
        else:
            self._kill()
        supervisor = self._tasks[0] if self._tasks else None
        for task in self._tasks[1:]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if supervisor is not None:
            try:
                async with asyncio.timeout(STOP_WAIT):
                    await asyncio.shield(supervisor)
            except TimeoutError:
                log.error("shadow worker did not stop within %.0f s: killed", STOP_WAIT)
                self._kill()
                supervisor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await supervisor
        self._tasks = []
        await self.tally.last_flush(self.ledger)

    async def flush(self) -> None:
        """The tally to the ledger; what cannot be written is kept for the next flush."""
        await self.tally.flush(self.ledger)

    # -- the worker ------------------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = RESTART_FIRST
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                code = await self._run_worker()
                reason = f"exit code {code}"
            except asyncio.CancelledError:
                self._kill()
                raise
            except Exception as exc:
                reason = type(exc).__name__
                self._kill()
            finally:
                self._ready.clear()
                self._writer = None
                self.pid = None
                self._lost()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > RESTART_MAX:
                delay = RESTART_FIRST
            log.error("shadow worker ended (%s): starting another in %.1f s", reason, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            delay = min(delay * 2, RESTART_MAX)
            self.restarts += 1

    async def _run_worker(self) -> int | None:
        ours, theirs = socket.socketpair()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "shadow.worker",
                str(theirs.fileno()),
                self.settings.priority,
                str(logging.getLogger().getEffectiveLevel()),
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # its own CPU group: see shadow.worker.lower_priority
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            writer.write(frame(self._hello))
            async with asyncio.timeout(READY_WAIT):
                first = await read_to_proxy(reader)
            if not isinstance(first, Ready):
                raise ConnectionError("the shadow worker did not say it was ready")
            if self._stopping.is_set():  # stopped while it started: it holds nothing
                writer.write_eof()
            else:
                self.pid = first.pid
                self._writer = writer
                self._ready.set()
                log.info("shadow worker %d ready (priority %s)", first.pid, self.settings.priority)
            while True:
                try:
                    async with asyncio.timeout(SILENT_WAIT):
                        message = await read_to_proxy(reader)
                except TimeoutError:
                    raise ConnectionError("the shadow worker went silent") from None
                if message is None:
                    break
                if isinstance(message, Report):
                    self._apply(message)
                elif isinstance(message, Joined):
                    waiter = self._joins.pop(message.id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
        finally:
            self._ready.clear()
            writer.close()
        return await self._proc.wait()

    def _apply(self, report: Report) -> None:
        """A worker's report: its jobs done and their outcomes, in one step."""
        self.tally.add(
            Counter({(d, r, o, v): n for d, r, o, v, n in report.counts}),
            Counter({(d, r, why, v): n for d, r, why, v, n in report.errors}),
            list(report.mismatches),
        )
        for seq in report.seqs:
            self._inflight.pop(seq, None)

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def _lost(self) -> None:
        """The jobs a worker that ended had not reported: counted ``dropped``; waiting joins
        released (what they waited for is accounted for now)."""
        if self._inflight:
            log.error(
                "shadow worker ended holding %d shadow reads: counted dropped",
                len(self._inflight),
            )
            for dataset, route, version in self._inflight.values():
                self.count(dataset, route, "dropped", version)
            self._inflight.clear()
        for waiter in self._joins.values():
            if not waiter.done():
                waiter.set_result(None)
        self._joins.clear()
