"""A TCP proxy a test puts in front of a loopback server and turns faulty, to cause failures."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
from collections.abc import AsyncIterator, Coroutine
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FaultProxy", "fault_proxy", "upstream_of"]

# Large reads keep the per-chunk cost (a task switch each way) small when a test pushes
# thousands of requests through the proxy.
CHUNK = 64 * 1024

# After cut() sends FIN, a peer that never closes its side is closed this long after.
CUT_GRACE = 1.0

# How long a closing side may take to flush before it is aborted, so stop() never hangs on a
# peer that stopped reading.
CLOSE_GRACE = 1.0

# linux/tcp.h: a socket in repair mode is closed without sending anything (CRIU's option).
TCP_REPAIR = 19

DEFAULT_PORTS = {
    "postgresql": 5432,
    "postgres": 5432,
    "redis": 6379,
    "rediss": 6379,
    "http": 80,
    "https": 443,
}

_log = logging.getLogger(__name__)


class _Mode(enum.Enum):
    PASS = "pass"
    RESET = "reset"
    CUT = "cut"
    BLACKHOLE = "blackhole"


class _State(enum.Enum):
    OPEN = "open"
    CUT = "cut"
    RESET = "reset"


class _Side:
    """One TCP connection of a link: to the client, or to the upstream server."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send_fin(self) -> None:
        if not self.writer.is_closing():
            with contextlib.suppress(OSError):
                self.writer.write_eof()

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    def drop_silently(self) -> None:
        """Close the socket without a FIN or an RST, as if its host had vanished: the peer
        learns only when it next sends something, and is answered with a reset. Needs
        CAP_NET_ADMIN (``TCP_REPAIR``)."""
        sock = self.writer.get_extra_info("socket")
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        except OSError as exc:
            raise RuntimeError(
                f"vanish() needs CAP_NET_ADMIN to put a socket in TCP_REPAIR mode: {exc}"
            ) from exc
        self.writer.transport.abort()

    def abort_with_rst(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN, as a crashed host
        # or a middlebox dropping state would.
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def closed(self) -> None:
        """Wait until the socket is really closed (so no ResourceWarning), aborting a slow one."""
        self.close()
        loop = asyncio.get_running_loop()
        timer = loop.call_later(CLOSE_GRACE, self.writer.transport.abort)
        try:
            await self.writer.wait_closed()
        except OSError:
            # wait_closed re-raises the error the connection died of; it is already handled.
            pass
        finally:
            timer.cancel()


class _Link:
    """A client connection and, once connected, its upstream twin."""

    def __init__(self, name: str, client: _Side) -> None:
        self.name = name
        self.client = client
        self.upstream: _Side | None = None
        self.state = _State.OPEN
        # Silent: bytes are read and dropped both ways and nothing is closed (a partition).
        self.silent = False
        # Set once the link is cut or reset, which ends even a silent link's hold.
        self.ended = asyncio.Event()
        self._cut_timer: asyncio.TimerHandle | None = None

    def sides(self) -> list[_Side]:
        return [self.client] if self.upstream is None else [self.client, self.upstream]

    def reset(self) -> None:
        self.state = _State.RESET
        self.silent = False
        self.ended.set()
        for side in self.sides():
            side.abort_with_rst()

    def cut(self) -> None:
        # FIN first and keep reading: closing a socket with unread bytes in its receive buffer
        # makes the kernel send RST, and a cut must look like a clean close to the peer.
        if self.state is not _State.OPEN:
            return
        self.state = _State.CUT
        self.silent = False
        self.ended.set()
        for side in self.sides():
            side.send_fin()
        self._cut_timer = asyncio.get_running_loop().call_later(CUT_GRACE, self.close)

    def close(self) -> None:
        for side in self.sides():
            side.close()

    async def closed(self) -> None:
        if self._cut_timer is not None:
            self._cut_timer.cancel()
        for side in self.sides():
            await side.closed()


class FaultProxy:
    """A TCP proxy in front of ``upstream_host:upstream_port`` that a test can make faulty.

    Faults apply to the open connections and to every new one until :meth:`heal`:

    - :meth:`latency` holds every chunk, in both directions, for some seconds before
      forwarding it (reading that direction pauses meanwhile);
    - :meth:`reset` aborts connections with a TCP RST;
    - :meth:`cut` closes them cleanly with a FIN (after which the proxy drains what the peer
      still sends, and closes fully when the peer closes or after ``CUT_GRACE`` seconds);
    - :meth:`blackhole` is a silent partition: new connections are accepted and held, bytes
      are read and dropped both ways (so a peer's send never errors), nothing is ever
      forwarded or closed, not even a FIN or RST from either peer;
    - :meth:`vanish` is a blackhole as the upstream server sees a partition or a client's
      host gone: the client side is silent as above, and each upstream connection is dropped
      without a word (``TCP_REPAIR``), so the server finds out only by its own TCP keepalive
      probes (or retransmissions), which this host answers with a reset. A blackhole alone
      cannot show the server's side: the proxy's kernel acknowledges whatever it reads.

    A blackholed connection stays silent after :meth:`heal`: its bytes were dropped, so its
    stream can never be valid again, and like a connection across a real partition its fate is
    unknown to both ends. :meth:`reset` or :meth:`cut` (the partition ends and the connection
    turns out dead) or :meth:`stop` closes it; a peer giving up closes only its own side.

    Use as ``async with FaultProxy(host, port) as proxy:`` or see :func:`fault_proxy`.
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._mode = _Mode.PASS
        self._latency = 0.0
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures: list[BaseException] = []
        self._accepted = 0

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.host}:{self.port} -> {self.upstream_host}:{self.upstream_port}"
            f" {self._mode.value} latency={self._latency} connections={self.connections}>"
        )

    @property
    def connections(self) -> int:
        """Client connections the proxy holds open (a blackholed one until :meth:`stop`)."""
        return len(self._links)

    @property
    def accepted(self) -> int:
        """Client connections accepted since the start."""
        return self._accepted

    @property
    def silent(self) -> int:
        """Connections held silent by a blackhole (until :meth:`reset`, :meth:`cut` or
        :meth:`stop`, even after :meth:`heal`)."""
        return sum(1 for link in self._links if link.silent)

    def url(self, url: str) -> str:
        """``url`` (postgresql://, redis://, http://...) pointed at the proxy instead."""
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{self.port}"))

    async def start(self) -> None:
        """Listen; with port 0 a free port is picked and stored in ``port``."""
        if self._server is not None:
            raise RuntimeError(f"{self!r} is already started")
        # A plain (not async) callback: asyncio would otherwise start an anonymous task per
        # connection, which stop() could not find and cancel.
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, limit=4 * CHUNK
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and every connection, and wait until all of the proxy's tasks end.

        Raises if one of the proxy's own tasks failed unexpectedly (a bug in the proxy, which a
        test must not mistake for the fault it caused).
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        if self._failures:
            failure = self._failures[0]
            raise RuntimeError(f"{self!r}: a proxy task failed: {failure!r}") from failure

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def latency(self, seconds: float) -> None:
        """Hold every chunk ``seconds`` before forwarding it, both directions (0 to stop)."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._latency = seconds

    def reset(self) -> None:
        """Abort every connection with a TCP RST; new ones are reset as soon as accepted."""
        self._mode = _Mode.RESET
        for link in list(self._links):
            link.reset()

    def cut(self) -> None:
        """Close every connection cleanly (FIN); new ones are closed as soon as accepted."""
        self._mode = _Mode.CUT
        for link in list(self._links):
            link.cut()

    def blackhole(self) -> None:
        """A silent partition: forward nothing, close nothing, accept and hold new connections."""
        self._mode = _Mode.BLACKHOLE
        for link in self._links:
            link.silent = True

    def vanish(self) -> None:
        """:meth:`blackhole`, and every upstream connection dropped without a FIN or an RST:
        the server learns of it only when it next sends (a keepalive probe), as across a
        partition. Needs CAP_NET_ADMIN."""
        self.blackhole()
        for link in self._links:
            if link.upstream is not None:
                upstream, link.upstream = link.upstream, None
                upstream.drop_silently()

    def heal(self) -> None:
        """New connections pass again, without latency; blackholed ones stay silent."""
        self._mode = _Mode.PASS
        self._latency = 0.0

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        link = _Link(f"fault-proxy:{self.port} link {self._accepted}", _Side(reader, writer))
        self._links.add(link)
        if self._mode is _Mode.RESET:
            link.reset()
        elif self._mode is _Mode.CUT:
            link.cut()
        elif self._mode is _Mode.BLACKHOLE:
            link.silent = True
        self._spawn(self._serve(link), name=link.name)

    def _spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        failure = task.exception()
        if failure is not None:
            self._failures.append(failure)
            _log.error("fault proxy task %s failed", task.get_name(), exc_info=failure)

    async def _serve(self, link: _Link) -> None:
        try:
            if link.state is _State.OPEN and not link.silent:
                await self._connect(link)
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    self._pump(link, link.client, link.upstream), name=f"{link.name} c->u"
                )
                if link.upstream is not None:
                    group.create_task(
                        self._pump(link, link.upstream, link.client), name=f"{link.name} u->c"
                    )
            if link.silent:
                # Held open, as across a partition, until cut, reset or stop().
                await link.ended.wait()
        finally:
            link.close()
            await link.closed()
            self._links.discard(link)

    async def _connect(self, link: _Link) -> None:
        try:
            reader, writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port, limit=4 * CHUNK
            )
        except OSError:
            # A refused connection looks like a reset to a client connecting directly.
            link.reset()
            return
        upstream = _Side(reader, writer)
        if link.state is not _State.OPEN:
            # The link was cut or reset while it connected: the upstream never gets used.
            await upstream.closed()
            return
        link.upstream = upstream

    async def _pump(self, link: _Link, source: _Side, target: _Side | None) -> None:
        try:
            while data := await source.reader.read(CHUNK):
                if link.silent or link.state is not _State.OPEN or target is None:
                    continue
                if self._latency > 0:
                    await asyncio.sleep(self._latency)
                    if link.silent or link.state is not _State.OPEN:
                        continue
                target.writer.write(data)
                await target.writer.drain()
        except OSError:
            # A peer reset its connection (or writing to it failed): mirror the reset to the
            # other peer, unless a partition keeps the news from crossing.
            if not link.silent and link.state is _State.OPEN:
                link.reset()
            return
        if link.silent:
            return
        if link.state is _State.OPEN:
            if target is not None:
                # A half-close crosses as a half-close: the other direction keeps flowing.
                target.send_fin()
        else:
            # After a cut (or reset), the peer's FIN ends this side.
            source.close()


def upstream_of(url: str) -> tuple[str, int]:
    """The ``(host, port)`` a postgresql://, redis:// or http(s):// URL points at."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"no TCP host in {url!r}")
    port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    if port is None:
        raise ValueError(f"no port in {url!r} and no default for scheme {parts.scheme!r}")
    return parts.hostname, port


@contextlib.asynccontextmanager
async def fault_proxy(url: str) -> AsyncIterator[FaultProxy]:
    """A started :class:`FaultProxy` in front of the server ``url`` points at.

    ``async with fault_proxy(pg_url) as proxy: await asyncpg.connect(proxy.url(pg_url))``
    """
    host, port = upstream_of(url)
    async with FaultProxy(host, port) as proxy:
        yield proxy
