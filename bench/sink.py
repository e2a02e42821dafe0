"""A backend that takes every write and stores nothing: the ceiling of the replayer itself.

`bench/dual_write.py` drains a second backlog into it, so the replay rate it prints is not
bounded by what the reference API can absorb. It answers 200 with an empty JSON object to
every request, on bascule's own lean HTTP server.

    .venv/bin/python bench/sink.py --port 8099
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from collections.abc import Awaitable, Callable

from proxy.server import Request, Responder, Server

Handler = Callable[[Request, Responder], Awaitable[None]]


async def answer(request: Request, out: Responder) -> None:
    await out.send(200, [("Content-Type", "application/json")], b"{}")


async def serve(handler: Handler, port: int, max_body_bytes: int) -> None:
    """``handler`` on bascule's own lean HTTP server, on 127.0.0.1:``port``, until SIGTERM or
    SIGINT."""
    server = Server(handler, max_body_bytes=max_body_bytes)
    await server.start("127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close(grace=1.0)


def run(handler: Handler, description: str, max_body_bytes: int) -> None:
    """The command line of a sink: ``--port PORT``, then :func:`serve`."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    with contextlib.suppress(ImportError):  # as `bascule proxy` does, where the platform has it
        import uvloop

        uvloop.install()
    asyncio.run(serve(handler, port, max_body_bytes))


if __name__ == "__main__":
    run(answer, __doc__, 1024 * 1024)
