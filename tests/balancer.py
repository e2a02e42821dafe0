"""A small load balancer for tests, doing what a real one does in front of bascule replicas.

Round robin over the replicas, one TCP connection at a time (as a Kubernetes Service or a
layer-4 cloud balancer: a client's kept-alive connection stays on the replica it reached), and
only to replicas whose ``/readyz`` said 200 at the last poll (every ``every`` seconds). It
never retries: a replica that refuses or drops a connection fails that client, which is what
a replica stopping badly does to researchers behind a real balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp

from bascule.tasks import spawn


@dataclass
class Balancer:
    backends: Sequence[str]
    """The replicas' researcher URLs (http://host:port)."""
    readiness: Sequence[str]
    """Each replica's /readyz URL, in the same order."""
    every: float = 0.2
    ready: list[bool] = field(default_factory=list)
    url: str = ""
    sent: list[int] = field(default_factory=list)
    """Connections sent to each replica."""
    refused: int = 0
    """Client connections closed because no replica was ready."""
    _turn: int = 0

    def pick(self) -> int | None:
        for _ in range(len(self.backends)):
            i = self._turn % len(self.backends)
            self._turn += 1
            if self.ready[i]:
                return i
        return None

    async def poll(self) -> None:
        timeout = aiohttp.ClientTimeout(total=max(self.every, 0.5))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                for i, url in enumerate(self.readiness):
                    try:
                        async with session.get(url) as resp:
                            await resp.read()
                            self.ready[i] = resp.status == 200
                    except (aiohttp.ClientError, TimeoutError):
                        self.ready[i] = False
                await asyncio.sleep(self.every)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        i = self.pick()
        if i is None:
            self.refused += 1
            writer.close()
            return
        self.sent[i] += 1
        host, port = self.backends[i].removeprefix("http://").rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    if dst.can_write_eof():
                        dst.write_eof()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()


@asynccontextmanager
async def balancer(
    backends: Sequence[str], admin_urls: Sequence[str], every: float = 0.2
) -> AsyncIterator[Balancer]:
    """A :class:`Balancer` on a loopback port, polling readiness, until the block ends."""
    lb = Balancer(backends, [f"{a}/readyz" for a in admin_urls], every)
    lb.ready = [False] * len(backends)
    lb.sent = [0] * len(backends)
    server = await asyncio.start_server(lb.handle, "127.0.0.1", 0)
    lb.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    poller = spawn(lb.poll(), name="balancer-poll")
    try:
        while not any(lb.ready):
            await asyncio.sleep(0.05)
        yield lb
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        server.close()
        await server.wait_closed()
