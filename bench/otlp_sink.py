"""A local OTLP/HTTP receiver that accepts every export and keeps nothing: the collector of
``bench/proxy_overhead.py``'s ``bascule/traced`` row, so that a proxy's exporters do all their
work (encode, send, get an answer) without a collector's cost on the machine measured.

It answers ``POST /v1/traces``, ``/v1/metrics`` and ``/v1/logs`` with an empty protobuf
answer (a full success), and ``GET /stats`` with how many exports and bytes it took.

    .venv/bin/python bench/otlp_sink.py --port 4318
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from bench.sink import run
from proxy.server import Request, Responder

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


if __name__ == "__main__":
    run(answer, __doc__, 64 * 1024 * 1024)
