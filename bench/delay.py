"""A slow backend: a TCP relay that hands on every byte of the backend's answers DELAY late.

`bench/proxy_overhead.py` puts it in front of the shadowed backend. It is a delay line, not a
queue: each answer reaches the client DELAY seconds after the backend sent it, and answers keep
flowing at the backend's own rate (as over a long link). Requests go through at once; keep-alive
connections stay open, so a pool in front of it keeps its connections.

    .venv/bin/python bench/delay.py --port 8098 --backend 127.0.0.1:8000 --delay 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from bascule.tasks import spawn

_CHUNK = 64 * 1024


async def _upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Client to backend, at once; the client's end of stream closes the backend connection."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _delayed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    """Backend to client, each chunk ``delay`` seconds after it arrived, in order."""
    loop = asyncio.get_running_loop()
    line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def take() -> None:
        data = b""
        try:
            while data := await reader.read(_CHUNK):
                line.put_nowait((loop.time() + delay, data))
        except ConnectionError:
            pass
        line.put_nowait((loop.time() + delay, b""))  # end of stream, just as late

    taker = spawn(take(), name="delay-take")
    try:
        while True:
            due, data = await line.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        taker.cancel()
        writer.close()


async def main(port: int, backend: str, delay: float) -> None:
    host, backend_port = backend.rsplit(":", 1)

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            backend_r, backend_w = await asyncio.open_connection(host, int(backend_port))
        except OSError:
            client_w.close()
            return
        up = spawn(_upstream(client_r, backend_w), name="delay-upstream")
        await _delayed(backend_r, client_w, delay)
        up.cancel()
        backend_w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True, help="HOST:PORT")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds (default 0.2)")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(main(args.port, args.backend, args.delay))
