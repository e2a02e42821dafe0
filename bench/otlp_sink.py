"""A local OTLP/HTTP receiver that accepts every export and keeps nothing: the collector of
``bench/proxy_overhead.py``'s ``bascule/traced`` row, so that a proxy's exporters do all their
work (encode, send, get an answer) without a collector's cost on the machine measured.

It answers ``POST /v1/traces``, ``/v1/metrics`` and ``/v1/logs`` with an empty protobuf
answer (a full success), and ``GET /stats`` with how many exports and bytes it took.

    .venv/bin/python bench/otlp_sink.py --port 4318
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from proxy.server import Request, Responder, Server

taken: Counter[str] = Counter()


async def answer(request: Request, out: Responder) -> None:
    if request.method == "POST" and request.target.startswith("/v1/"):
        body = await request.read()
        kind = request.target.removeprefix("/v1/")
        taken[f"{kind} exports"] += 1
        taken[f"{kind} bytes"] += len(body)
        await out.send(200, [("Content-Type", "application/x-protobuf")], b"")
        return
    payload = json.dumps(dict(taken)).encode()
    await out.send(200, [("Content-Type", "application/json")], payload)


async def main(port: int) -> None:
    server = Server(answer, max_body_bytes=64 * 1024 * 1024)
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
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(main(port))
