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

from proxy.server import Request, Responder, Server


async def answer(request: Request, out: Responder) -> None:
    await out.send(200, [("Content-Type", "application/json")], b"{}")


async def main(port: int) -> None:
    server = Server(answer, max_body_bytes=1024 * 1024)
    await server.start("127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close(grace=1.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    with contextlib.suppress(ImportError):  # as `bascule proxy` does, where the platform has it
        import uvloop

        uvloop.install()
    asyncio.run(main(port))
