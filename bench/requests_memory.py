"""The proxy's memory under the two clients of issue 16 that grew it: one that pipelines
requests and never reads its answers, and a loop of large uploads.

Each scenario runs a fresh `bascule proxy` process (datasets at `source`) in front of a sink
backend in this process (it reads and drops request bodies, answers 4 KiB), and prints the
proxy's resident memory (VmRSS) before and after, and its peak (VmHWM):

  pipelining  one client sends pipelined GETs as fast as the proxy takes them, never reads
              an answer, for --seconds; meanwhile a second client's requests are timed
  uploads     --uploads POSTs of --upload-mb MiB each, one after the other: a read
              (`POST /v1/datasets/dcir/query`, streamed to the backend) and an unrouted
              write at `source` (`POST /upload`, read whole: a write holds its dataset's fence)

--repo runs the proxy from another checkout of bascule (e.g. one of the commit before a fix,
made with `git archive`), so that one machine gives the before and after figures; this
script, the sink and the stores come from this checkout. Nothing is asserted.

    .venv/bin/python bench/requests_memory.py [--repo PATH] [--only pipelining,uploads]
        [--seconds 30] [--uploads 7] [--upload-mb 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from bascule.procs import ServerProcess
from bascule.state.servers import create_database, drop_database, free_ports, provide_stores
from refapi.lab import PROXY_ENV, migrate_state, write_config

HERE = Path(__file__).resolve().parents[1]
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4096\r\n\r\n" + (
    b"a" * 4096
)


def memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid``, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


@asynccontextmanager
async def sink() -> AsyncIterator[str]:
    """A backend that reads every request, drops its body, and answers 4 KiB."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while length:
                    chunk = await reader.read(min(length, 1 << 20))
                    if not chunk:
                        return
                    length -= len(chunk)
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


@asynccontextmanager
async def proxy(
    repo: Path, backend: str, postgres: str, redis: str, max_body: int, workdir: Path
) -> AsyncIterator[tuple[str, int]]:
    config = workdir / "bascule.toml"
    write_config(
        config,
        source_url=backend,
        target_url=backend,
        postgres_url=postgres,
        redis_url=redis,
        redis_prefix=f"benchmem{os.getpid()}:",
        max_body_bytes=max_body,
        read_timeout=60.0,
    )
    port, admin = free_ports(2)
    runs = f"import sys; sys.path.insert(0, {str(repo)!r}); from bascule.cli import main; "
    proc = ServerProcess(
        name="proxy",
        argv=[
            sys.executable,
            "-c",
            runs + "sys.exit(main(sys.argv[1:]))",
            "proxy",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
        ],
        health_url=f"http://127.0.0.1:{admin}/readyz",
        log_path=workdir / "proxy.log",
        env={**PROXY_ENV, "PYTHONPATH": str(repo)},
    )
    await proc.start()
    assert proc.proc is not None
    try:
        yield f"127.0.0.1:{port}", proc.proc.pid
    finally:
        await proc.stop()


async def timed_get(address: str) -> float:
    """One GET on a connection of its own: seconds to its whole answer (inf: none in 10 s)."""
    host, port = address.rsplit(":", 1)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /v1/datasets/dcir/records/1 HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(4096)
            writer.close()
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return float("inf")
    return time.perf_counter() - started


async def pipelining(address: str, pid: int, seconds: float) -> None:
    host, port = address.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    greedy = socket.socket()
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    greedy.setblocking(False)
    await loop.sock_connect(greedy, (host, int(port)))
    request = b"GET /v1/datasets/dcir/records/1 HTTP/1.1\r\nHost: x\r\n\r\n" * 256
    before = memory(pid)
    sent = 0
    others: list[float] = []
    deadline = time.monotonic() + seconds
    next_probe = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            sent += greedy.send(request)
        except BlockingIOError:
            await asyncio.sleep(0.01)  # the proxy stopped taking requests: it waits for us
        except OSError:
            break
        if time.monotonic() >= next_probe:
            others.append(await timed_get(address))
            next_probe = time.monotonic() + 1.0
        await asyncio.sleep(0)
    after = memory(pid)
    greedy.close()
    answered = [t for t in others if t != float("inf")]
    print(
        f"pipelining  {seconds:.0f} s, {sent // 1024} KiB of requests sent (socket buffers "
        "included): "
        f"RSS {before[0]:.0f} -> {after[0]:.0f} MiB, peak {after[1]:.0f} MiB; "
        f"another client: {len(answered)}/{len(others)} GETs answered, "
        f"slowest {max(answered, default=float('nan')) * 1000:.0f} ms"
    )


async def uploads(address: str, pid: int, count: int, size: int) -> None:
    host, port = address.rsplit(":", 1)
    chunk = b"u" * (1 << 20)
    for name, line in (
        ("read  (query)", b"POST /v1/datasets/dcir/query HTTP/1.1"),
        ("write (unrouted)", b"POST /upload HTTP/1.1"),
    ):
        before = memory(pid)
        started = time.perf_counter()
        for _ in range(count):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(line + b"\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
            left = size
            while left:
                writer.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
                await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            writer.close()
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.5)
        after = memory(pid)
        print(
            f"uploads     {name}: {count} x {size >> 20} MiB in {elapsed:.1f} s: "
            f"RSS {before[0]:.0f} -> {after[0]:.0f} MiB, peak so far {after[1]:.0f} MiB"
        )


async def main(args: argparse.Namespace) -> None:
    repo = Path(args.repo).resolve()
    only = set(args.only.split(","))
    size = args.upload_mb << 20
    print(f"proxy code: {repo}")
    with provide_stores() as stores, tempfile.TemporaryDirectory() as tmp:
        name = f"bench_reqmem_{os.getpid()}"
        postgres = await create_database(stores.postgres_url, name)
        try:
            await migrate_state(postgres)
            async with sink() as backend:
                if "pipelining" in only:
                    async with proxy(
                        repo, backend, postgres, stores.redis_url, 1 << 20, Path(tmp)
                    ) as (address, pid):
                        await pipelining(address, pid, args.seconds)
                if "uploads" in only:
                    async with proxy(
                        repo, backend, postgres, stores.redis_url, size + 1, Path(tmp)
                    ) as (address, pid):
                        await uploads(address, pid, args.uploads, size)
        finally:
            await drop_database(stores.postgres_url, name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(HERE), help="the checkout the proxy runs from")
    parser.add_argument("--only", default="pipelining,uploads")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--uploads", type=int, default=7)
    parser.add_argument("--upload-mb", type=int, default=100)
    asyncio.run(main(parser.parse_args()))
