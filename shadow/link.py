"""The proxy's end of its shadow worker process: the researcher's path hands shadow reads over.

With ``[shadow] worker = "process"`` (the default) a replica's shadow reads run in a process of
their own (:mod:`shadow.worker`) at a lower CPU priority (``[shadow] priority``): their
requests, comparisons of answers of several megabytes and journal look-ups never hold the
event loop researchers are served from, and on a busy machine they take only the CPU the
researchers leave. The researcher's path here does what it did with an inline dispatcher —
sample, note ``t0``, keep the answer — and :meth:`ShadowLink.submit` writes the job to a socket
without waiting.

Nothing is lost silently:
- a job that does not fit (the link's buffer holds ``4 x max_body_bytes`` at most, as the
  inline dispatcher's budget does) or that comes while no worker is ready is counted
  ``dropped`` here, flushed to the ledger about once a second;
- the worker reports each job it has counted (:class:`shadow.wire.Done`); when it dies, the
  jobs it had not reported are counted ``dropped`` here, and it is started again (backing off
  from 0.5 s to 30 s).
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

from bascule.config import Config, Secrets
from bascule.tasks import spawn
from shadow.dispatch import DbClock, Job, Sampling
from shadow.ledger import Ledger, Outcome
from shadow.wire import Done, Hello, Join, Joined, Ready, frame, job_frame, read_to_proxy

log = logging.getLogger("bascule.shadow")

RESTART_FIRST, RESTART_MAX = 0.5, 30.0
READY_WAIT = 60.0
"""Seconds a new worker has to open its stores and say it is ready."""
START_WAIT = 10.0
"""Seconds :meth:`ShadowLink.start` waits for the first worker: the proxy serves either way
(reads shadowed meanwhile are counted ``dropped``)."""
STOP_WAIT = 15.0
"""Seconds a stopping worker has to count what it holds and flush, before it is killed."""


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
        """``ledger``: where the jobs dropped on this side are counted. ``clock_pool``: the
        state database, for the clock ``t0`` is read from (:class:`DbClock`)."""
        self.config = config
        self.settings = config.shadow
        self.ledger = ledger
        self.clock = DbClock()
        self.clock_pool = clock_pool
        self.rng = rng or random.Random()
        self.budget = 4 * self.settings.max_body_bytes
        self._hello = Hello(config, secrets, postgres_url, redis_url, replica)
        self._counts: Counter[tuple[str, str, Outcome]] = Counter()
        self._inflight: dict[int, tuple[str, str]] = {}
        """Jobs sent and not yet reported done: (dataset, route) by number."""
        self._seq = 0
        self._joins: dict[int, asyncio.Future[None]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self.pid: int | None = None
        """The running worker's process id (None while there is none)."""
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None

    # -- the researcher's path -------------------------------------------------------------

    def room(self) -> int:
        """Bytes a new shadow read may hold now: what the link's buffer has left."""
        if self._writer is None or not self._ready.is_set():
            return 0
        return max(0, self.budget - self._writer.transport.get_write_buffer_size())

    def submit(self, job: Job) -> None:
        """Hand a job to the worker; never waits. No room, or no worker: dropped, counted."""
        writer = self._writer
        if writer is None or not self._ready.is_set() or writer.is_closing():
            return self.count(job.dataset, job.route, "dropped")
        self._seq += 1
        try:
            data = frame(job_frame(job, self._seq))
        except (TypeError, ValueError) as exc:  # never the researcher's failure
            log.error("shadow read of %s %s not sent: %s", job.dataset, job.route, type(exc))
            return self.count(job.dataset, job.route, "dropped")
        if writer.transport.get_write_buffer_size() + len(data) > self.budget:
            return self.count(job.dataset, job.route, "dropped")
        self._inflight[self._seq] = (job.dataset, job.route)
        writer.write(data)

    def count(self, dataset: str, route: str, outcome: Outcome) -> None:
        self._counts[(dataset, route, outcome)] += 1

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Measure the clock, start the worker and wait (bounded) for it to be ready: a
        worker that cannot start is logged and retried, and the proxy serves meanwhile."""
        await self._calibrate()
        self._tasks = [
            spawn(self._supervise(), name="shadow-link"),
            spawn(self._housekeeping(), name="shadow-link-housekeeping"),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), START_WAIT)

    async def ready(self) -> None:
        """Until a worker is ready (tests)."""
        await self._ready.wait()

    async def join(self) -> None:
        """Until every job sent so far is done and counted, and the counts flushed."""
        writer = self._writer
        if writer is not None and self._ready.is_set():
            self._seq += 1
            waiter = asyncio.get_running_loop().create_future()
            self._joins[self._seq] = waiter
            writer.write(frame(Join(self._seq)))
            await waiter
        await self.flush()

    async def stop(self) -> None:
        self._stopping = True
        writer = self._writer
        if writer is not None and not writer.is_closing():
            with contextlib.suppress(OSError):
                writer.write_eof()  # the worker drops what it holds, counts it, and exits
        supervisor = self._tasks[0] if self._tasks else None
        for task in self._tasks[1:]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if supervisor is not None:
            try:
                await asyncio.wait_for(asyncio.shield(supervisor), STOP_WAIT)
            except TimeoutError:
                log.error("shadow worker did not stop within %.0f s: killed", STOP_WAIT)
                self._kill()
                supervisor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await supervisor
        self._tasks = []
        with contextlib.suppress(Exception):
            await self.flush()

    async def flush(self) -> None:
        """This side's counts to the ledger; kept for the next flush when Redis is away."""
        counts, self._counts = self._counts, Counter()
        if counts and not await self.ledger.count_many(counts):
            self._counts.update(counts)

    # -- the worker ------------------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = RESTART_FIRST
        while not self._stopping:
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
            if self._stopping:
                return
            if time.monotonic() - started > RESTART_MAX:
                delay = RESTART_FIRST
            log.error("shadow worker ended (%s): starting another in %.1f s", reason, delay)
            await asyncio.sleep(delay)
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
            first = await asyncio.wait_for(read_to_proxy(reader), READY_WAIT)
            if not isinstance(first, Ready):
                raise ConnectionError("the shadow worker did not say it was ready")
            self.pid = first.pid
            self._writer = writer
            self._ready.set()
            log.info("shadow worker %d ready (priority %s)", first.pid, self.settings.priority)
            while (message := await read_to_proxy(reader)) is not None:
                if isinstance(message, Done):
                    for seq in message.seqs:
                        self._inflight.pop(seq, None)
                elif isinstance(message, Joined):
                    waiter = self._joins.pop(message.id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
        finally:
            self._ready.clear()
            writer.close()
        return await self._proc.wait()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def _lost(self) -> None:
        """The jobs a worker that ended had not reported: counted ``dropped``; waiting joins
        released (what they waited for is accounted for now)."""
        if self._inflight:
            if not self._stopping:
                log.error(
                    "shadow worker ended holding %d shadow reads: counted dropped",
                    len(self._inflight),
                )
            for dataset, route in self._inflight.values():
                self.count(dataset, route, "dropped")
            self._inflight.clear()
        for waiter in self._joins.values():
            if not waiter.done():
                waiter.set_result(None)
        self._joins.clear()

    async def _calibrate(self) -> None:
        try:
            await self.clock.calibrate(self.clock_pool)
        except Exception as exc:
            log.warning("state database clock not measured (%s)", type(exc).__name__)

    async def _housekeeping(self) -> None:
        """Counts flushed every second; the clock measured every 10 s (every second until it
        is known)."""
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            try:
                if tick % 10 == 0 or not self.clock.calibrated:
                    await self._calibrate()
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next tick retries
                log.warning("shadow link housekeeping: %s", type(exc).__name__)
