"""The shadow worker process: a proxy's shadow reads, run beside it at a lower CPU priority.

Started by :class:`shadow.link.ShadowLink` as ``python -m shadow.worker FD PRIORITY LEVEL``,
FD being its end of a socket pair. It lowers its own CPU priority first (before any thread
exists, so every thread it starts inherits it), reads the :class:`shadow.wire.Hello`, opens its
own state stores and backend pools (:func:`shadow.reads.open_dispatcher`), reads the database's
clock, says :class:`Ready`, and then runs each job it is sent. It writes no count itself: every
0.1 s it reports which jobs are done with the outcomes counted meanwhile, in one frame, and the
proxy writes them (:mod:`shadow.tally`), so a worker that dies leaves no shadow read counted
twice or not at all. It ignores SIGTERM and SIGINT: the end of the socket (the proxy stopping,
or gone) stops it, with what is queued or in flight counted ``dropped`` and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from contextlib import AsyncExitStack

import redis.asyncio as aioredis

from bascule import logs, telemetry
from bascule.state.fleet import REDIS_TIMEOUT
from bascule.state.postgres import open_pool, session_name
from bascule.tasks import spawn
from shadow.dispatch import Job
from shadow.reads import open_dispatcher
from shadow.wire import Hello, Join, Joined, Ready, Reload, Report, frame, job_of, read_to_worker

log = logging.getLogger("bascule.shadow.worker")
REPORT_EVERY = 0.1
"""Seconds between the worker's reports of the jobs it has finished and their outcomes."""
ALIVE_EVERY = 1.0
"""Seconds after which an empty report is sent all the same: a sign of life."""
CLOCK_WAIT = 30.0
"""Seconds a new worker has to read the state database's clock before giving up."""


def lower_priority(priority: str) -> None:
    """``idle``: SCHED_IDLE (Linux), nice 19 elsewhere; ``low``: nice 19; ``normal``: as is.

    The worker leads a session of its own. Where the kernel groups tasks by session
    (autogroups: a proxy started from a shell), a group is weighed against the others whatever
    its tasks' policy, so the group is set to nice 19 too; under a service manager's cgroup
    the worker shares the proxy's group, where its own policy is what yields to the proxy."""
    if priority == "normal":
        return
    with contextlib.suppress(OSError):  # no autogroups here: nothing to weigh
        with open("/proc/self/autogroup", "w") as group:
            group.write("19")
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError as exc:
            log.warning("SCHED_IDLE refused (%s): nice 19 instead", exc.strerror)
    os.setpriority(os.PRIO_PROCESS, 0, 19)


async def serve(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    hello = await read_to_worker(reader)
    if not isinstance(hello, Hello):
        raise ConnectionError("the first frame on the shadow link was not a hello")
    # Its spans: every one recorded, exported when sampled, failed or divergent. No metrics:
    # the proxy counts what this worker reports.
    if hello.config.telemetry.enabled:
        telemetry.install(hello.config.telemetry, service="bascule-shadow", with_metrics=False)
    logs.setup(hello.config.telemetry.logs)
    finished: list[int] = []

    def done(job: Job) -> None:
        finished.append(job.seq)

    async with AsyncExitStack() as stack:
        # Noise observations and accepted rules only: the worker writes no count.
        pool = await open_pool(
            hello.postgres_url,
            # The race guard and clock hold the others (shadow/reads.py): `shadow_sessions`.
            max_size=1,
            application_name=session_name("shadow", hello.replica),
            dead_session_after=hello.config.state.dead_session_after,
        )
        stack.push_async_callback(pool.close)
        redis = aioredis.Redis.from_url(
            hello.redis_url, socket_connect_timeout=1.0, socket_timeout=REDIS_TIMEOUT
        )
        stack.push_async_callback(redis.aclose)
        dispatcher = await open_dispatcher(
            stack,
            hello.config,
            hello.secrets,
            pool=pool,
            redis=redis,
            postgres_url=hello.postgres_url,
            replica=hello.replica,
            done=done,
        )

        def report() -> bytes:
            """What was counted and which jobs are done, taken in one step: one frame."""
            counts, errors, evidence = dispatcher.tally.take()
            seqs = finished[:]
            del finished[:]
            return frame(
                Report(
                    seqs,
                    [(d, r, o, v, n) for (d, r, o, v), n in counts.items()],
                    [(d, r, why, v, n) for (d, r, why, v), n in errors.items()],
                    evidence,
                )
            )

        async def reporting() -> None:
            quiet = 0.0
            while True:
                await asyncio.sleep(REPORT_EVERY)
                quiet += REPORT_EVERY
                # Every outcome is recorded with its job done (Dispatcher._record).
                if finished or quiet >= ALIVE_EVERY:
                    writer.write(report())
                    quiet = 0.0

        # Never ready without the database's clock: every read would be errored for it.
        deadline = time.monotonic() + CLOCK_WAIT
        while not dispatcher.clock.calibrated:
            if time.monotonic() > deadline:
                raise ConnectionError("the state database's clock could not be read")
            await asyncio.sleep(0.5)
            await dispatcher.calibrate()
        writer.write(frame(Ready(os.getpid())))
        log.info("shadow reads of replica %s running", hello.replica)
        reporter = spawn(reporting(), name="shadow-worker-report")
        try:
            while (message := await read_to_worker(reader)) is not None:
                if isinstance(message, Join):
                    await dispatcher.join()
                    writer.write(report() + frame(Joined(message.id)))
                elif isinstance(message, Reload):
                    await dispatcher.reconfigure(message.config)
                    log.info("shadow reads of replica %s: configuration reloaded", hello.replica)
                elif isinstance(message, Hello):
                    raise ConnectionError("a second hello on the shadow link")
                else:
                    dispatcher.submit(job_of(message))
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            # The proxy closed its end, or the link broke: what is queued or in flight is
            # counted dropped, and everything counted goes to the proxy if it still listens.
            with contextlib.suppress(Exception):
                await dispatcher.stop()
            with contextlib.suppress(Exception):
                writer.write(report())
                await writer.drain()
    writer.close()


def main() -> int:
    if len(sys.argv) != 4:
        print(
            "usage: python -m shadow.worker FD PRIORITY LEVEL (the proxy starts it)",
            file=sys.stderr,
        )
        return 2
    _, fd, priority, level = sys.argv
    logging.basicConfig(level=int(level), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    lower_priority(priority)
    # Its life is its proxy's: a stop sent to the whole group (a service manager's, a
    # terminal's) reaches the proxy, which closes the link and so ends the worker cleanly.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    try:
        asyncio.run(serve(int(fd)))
    except (ConnectionError, KeyboardInterrupt) as exc:
        log.warning("shadow worker stopping: %s", type(exc).__name__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
