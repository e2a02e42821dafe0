"""What the proxy costs a researcher: the reference API called directly and through bascule.

One run measures, with the same request mix and fixed concurrency (1 and 32):
  direct      the reference API itself (the baseline)
  bascule     the same API through `bascule proxy` (dataset at `source`: passthrough)
  nginx       plain `proxy_pass` over the same API, when nginx is on PATH (a peer row)
and prints req/s, p50, p99, the proxy's CPU-µs per request (from /proc), and ratios to direct.

    .venv/bin/python bench/proxy_overhead.py [--requests 3000] [--rows 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for tests.harness

from bascule.procs import ServerProcess, bascule_argv
from bascule.stores import create_database, free_port, provide_stores
from tests.harness import RESEARCHER_TOKEN, SERVICE_TOKEN, migrate_state, write_config

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    name: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float | None
    sys_share: float | None
    answer_bytes: float


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def request_mix(rows: int) -> list[tuple[str, str, bytes | None]]:
    """About 1 KB JSON answers: a page of three records, one record, an aggregate query."""
    mix: list[tuple[str, str, bytes | None]] = []
    for i in range(1, 101):
        rid = 1 + (i * 37) % rows
        mix.append(("GET", f"/v1/datasets/dcir/records?after={rid}&limit=12", None))
        mix.append(("GET", f"/v1/datasets/pmsi/records/{rid}", None))
        mix.append(
            (
                "POST",
                "/v1/datasets/cepidc/query",
                b'{"group_by": "department", "metrics": ["count"],'
                b' "filters": {"department": {"in": ["75", "13", "69"]}}}',
            )
        )
    return mix


async def load(
    base: str, mix: Sequence[tuple[str, str, bytes | None]], total: int, concurrency: int
) -> tuple[list[float], int]:
    latencies: list[float] = []
    received = 0
    next_i = 0
    headers = {"Authorization": f"Bearer {RESEARCHER_TOKEN}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            nonlocal next_i, received
            while next_i < total:
                method, path, body = mix[next_i % len(mix)]
                next_i += 1
                started = time.perf_counter()
                async with session.request(method, base + path, data=body) as resp:
                    data = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{method} {path}: {resp.status} {data[:200]!r}")
                latencies.append(time.perf_counter() - started)
                received += len(data)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, received


async def measure(
    name: str,
    base: str,
    pid: int | None,
    mix: Sequence[tuple[str, str, bytes | None]],
    total: int,
    concurrency: int,
) -> Row:
    await load(base, mix, min(300, total), concurrency)  # warm pools and caches
    before = cpu_seconds(pid) if pid else (0.0, 0.0)
    started = time.perf_counter()
    latencies, received = await load(base, mix, total, concurrency)
    elapsed = time.perf_counter() - started
    cpu = share = None
    if pid:
        after = cpu_seconds(pid)
        user, system = after[0] - before[0], after[1] - before[1]
        cpu = (user + system) / total * 1e6
        share = system / (user + system) if user + system else 0.0
    q = statistics.quantiles(latencies, n=100)
    return Row(
        name, concurrency, total / elapsed, q[49] * 1e3, q[98] * 1e3, cpu, share, received / total
    )


def nginx_conf(workdir: Path, listen: int, upstream: str) -> Path:
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
master_process off;  # one process, so its CPU time is the proxying's
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    upstream api {{ server {upstream.removeprefix("http://")}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""
    )
    return conf


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bascule-bench-"))
    with provide_stores() as stores:
        api_db = await create_database(stores.postgres_url, "bench_api", replace=True)
        state_db = await create_database(stores.postgres_url, "bench_state", replace=True)
        subprocess.run(
            bascule_argv("api", "seed", "--database", api_db, "--rows", str(args.rows)),
            check=True,
            capture_output=True,
        )
        await migrate_state(state_db)
        api_port = free_port()
        api_url = f"http://127.0.0.1:{api_port}"
        env = {"BASCULE_API_TOKENS": f"{RESEARCHER_TOKEN},{SERVICE_TOKEN}"}
        config = workdir / "bascule.toml"
        cfg = write_config(
            config,
            source_url=api_url,
            target_url=api_url,
            postgres_url=state_db,
            redis_url=stores.redis_url,
            redis_prefix="bench:",
        )
        proxy_url = "http://" + cfg.proxy.listen
        admin_url = "http://" + cfg.proxy.admin_listen
        async with AsyncExitStack() as stack:
            api = ServerProcess(
                "reference API",
                bascule_argv(
                    "api", "--name", "azure", "--database", api_db, "--port", str(api_port)
                ),
                f"{api_url}/healthz",
                workdir / "api.log",
                env,
            )
            stack.push_async_callback(api.stop)
            await api.start()
            proxy = ServerProcess(
                "bascule proxy",
                bascule_argv("proxy", "--config", str(config)),
                f"{admin_url}/readyz",
                workdir / "proxy.log",
            )
            stack.push_async_callback(proxy.stop)
            await proxy.start()
            targets: list[tuple[str, str, int | None]] = [
                ("direct", api_url, None),
                ("bascule", proxy_url, proxy.proc.pid if proxy.proc else None),
            ]
            nginx = shutil.which("nginx")
            if nginx:
                port = free_port()
                for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                    (workdir / sub).mkdir()
                ngx = ServerProcess(
                    "nginx",
                    [nginx, "-c", str(nginx_conf(workdir, port, api_url)), "-p", str(workdir)],
                    f"http://127.0.0.1:{port}/healthz",
                    workdir / "nginx.log",
                )
                stack.push_async_callback(ngx.stop)
                await ngx.start()
                targets.append(
                    ("nginx", f"http://127.0.0.1:{port}", ngx.proc.pid if ngx.proc else None)
                )
            mix = request_mix(args.rows)
            if args.profile and proxy.proc:
                await profile(
                    args.profile, proxy.proc.pid, proxy_url, mix, args.profile_concurrency
                )
            rows = [
                await measure(name, url, pid, mix, args.requests, c)
                for c in (1, 32)
                for name, url, pid in targets
            ]
    report(rows, nginx is not None)


async def profile(
    out: str, pid: int, base: str, mix: Sequence[tuple[str, str, bytes | None]], concurrency: int
) -> None:
    """Sample the proxy with py-spy (if installed) under load at ``concurrency``."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    proc = await asyncio.create_subprocess_exec(
        spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        "6",
        "--format",
        "raw",
        "-o",
        out,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(0.5)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        await load(base, mix, 500, concurrency)
    await proc.wait()
    print(f"py-spy samples of the proxy written to {out}")


def report(rows: list[Row], with_nginx: bool) -> None:
    print(
        f"\nproxy overhead — {rows[0].answer_bytes:.0f} B mean answer, "
        f"{os.cpu_count()} cores{'' if with_nginx else ' (nginx not on PATH: no peer row)'}"
    )
    head = (
        f"{'target':<9}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU µs/req':>12}"
        f"{'(kernel)':>9}{'req/s x':>9}{'+p50 ms':>9}{'p99 x':>7}"
    )
    print(head)
    print("-" * len(head))
    base = {r.concurrency: r for r in rows if r.name == "direct"}
    for r in rows:
        b = base[r.concurrency]
        cpu = f"{r.cpu_us:.0f}" if r.cpu_us is not None else "-"
        kernel = f"{r.sys_share:.0%}" if r.sys_share is not None else "-"
        print(
            f"{r.name:<9}{r.concurrency:>5}{r.rps:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
            f"{cpu:>12}{kernel:>9}{r.rps / b.rps:>9.2f}{r.p50_ms - b.p50_ms:>+9.2f}"
            f"{r.p99_ms / b.p99_ms:>7.2f}"
        )
    print("\ntargets: proxy CPU <= 150 µs/request; added p50 <= 0.5 ms at concurrency 1")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="per row (default 3000)")
    parser.add_argument("--rows", type=int, default=1000, help="rows per dataset (default 1000)")
    parser.add_argument("--profile", metavar="FILE", help="py-spy raw samples of the proxy")
    parser.add_argument("--profile-concurrency", type=int, default=32)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(parser.parse_args()))
