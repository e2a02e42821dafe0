"""The shadow worker process: a proxy's shadow reads, run beside it at a lower CPU priority.

Started by :class:`shadow.link.ShadowLink` as ``python -m shadow.worker FD PRIORITY LEVEL``,
FD being its end of a socket pair. It lowers its own CPU priority first (before any thread
exists, so every thread it starts inherits it), reads the :class:`shadow.wire.Hello`, opens its
own state stores and backend pools (:func:`shadow.reads.open_dispatcher`), says
:class:`Ready`, and then runs each job it is sent. It tells the proxy which jobs are done, so
that a worker that dies leaves no shadow read unaccounted for. The end of the socket (the proxy
gone, or stopping it) stops it: queued jobs are counted ``dropped`` and the counts flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from contextlib import AsyncExitStack

import redis.asyncio as aioredis

from bascule import telemetry
from bascule.tasks import spawn
from cutover.store import open_pool
from shadow.dispatch import Job
from shadow.reads import open_dispatcher
from shadow.wire import Done, Hello, Join, Joined, Ready, frame, job_of, read_to_worker

log = logging.getLogger("bascule.shadow.worker")
DONE_EVERY = 0.1
"""Seconds between the worker's reports of the jobs it has finished."""


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
    finished: list[int] = []

    def done(job: Job) -> None:
        finished.append(job.seq)

    async with AsyncExitStack() as stack:
        pool = await open_pool(hello.postgres_url)
        stack.push_async_callback(pool.close)
        redis = aioredis.Redis.from_url(hello.redis_url, socket_connect_timeout=1.0)
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

        async def report() -> None:
            while True:
                await asyncio.sleep(DONE_EVERY)
                if finished:
                    seqs = finished[:]
                    del finished[:]
                    writer.write(frame(Done(seqs)))

        reporter = spawn(report(), name="shadow-worker-done")
        writer.write(frame(Ready(os.getpid())))
        log.info("shadow reads of replica %s running", hello.replica)
        try:
            while (message := await read_to_worker(reader)) is not None:
                if isinstance(message, Join):
                    await dispatcher.join()
                    seqs, finished[:] = finished[:], []
                    writer.write(frame(Done(seqs)) + frame(Joined(message.id)))
                elif isinstance(message, Hello):
                    raise ConnectionError("a second hello on the shadow link")
                else:
                    dispatcher.submit(job_of(message))
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        # The proxy has closed its end: stop (queued jobs dropped and counted), say so.
        await dispatcher.stop()
        with contextlib.suppress(ConnectionError):
            writer.write(frame(Done(finished)))
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
    telemetry.install()
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
