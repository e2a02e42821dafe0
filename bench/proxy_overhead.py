"""What the proxy costs a researcher: the reference API called directly and through bascule.

One run measures, with the same request mix and fixed concurrency (1 and 32):
  direct       the reference API itself (the baseline)
  bascule      the same API through `bascule proxy` (datasets at `source`: passthrough),
               telemetry off ([telemetry] enabled = false: no span, no metric)
  bascule/traced the same with telemetry on: metrics recorded (scraped on /metrics and pushed),
               spans by the default head ratio plus failed ones, exported by OTLP/HTTP to a
               local sink that accepts and discards (bench/otlp_sink.py, on the other cloud's
               cores, at SCHED_IDLE); its proxy CPU per request against the `bascule` row
               (target <= 1.15x)
  bascule/busy the same proxy while a process per core spins at SCHED_IDLE: a control, what
               work that only takes the CPU researchers leave costs them on this machine
  shadow       bascule with the mix's datasets moved to `shadow` (source -> dualwrite ->
               shadow), shadow_sample 1.0: every read is also asked of a second reference API
               over a copy of the same database, guarded against races and compared
               (`served_at` ignored) in the proxy's shadow worker process (SCHED_IDLE), and the
               ledger's counts are read from Redis after it. The second API, its database
               sessions and the slow relay run at SCHED_IDLE too (--shadowed idle, the
               default): they stand for the other cloud, whose machines researchers never
               share; --shadowed equal runs them at the serving side's priority
  nginx        plain `proxy_pass` over the first API, when nginx is on PATH (a peer row)
  mirror       nginx `mirror` over the same two APIs: served by the first, each request also
               sent to the second (a shadow without comparison: the peer of `shadow`)
and then, at concurrency 32, with the shadowed API made slow (bench/delay.py hands on its
answers --delay late, 200 ms by default):
  shadow/slow  bascule in `shadow`: shadow reads its queue (100 here) cannot hold are dropped
               and counted
  mirror/slow  nginx `mirror`: nginx does not finish a request before its mirror subrequest

Where the processes run (--cpus split, the default with 2 cores or more): the researchers' path
(this load generator, the proxies, nginx, the serving API, its database sessions and the state
databases') on the first half of the cores; the other cloud (the shadowed API, its database
sessions, the slow relay) and the proxies' shadow workers on the other half, as a proxy host
keeps a core for its worker and the other cloud has machines of its own. With every process on
every core (--cpus shared), idle-priority work on a core that researchers' requests also use
cost them 1.4-3.2x p99 at concurrency 1 on this 2-vCPU VM, however little CPU it took from
them (the bascule/busy control), and the shadowed API, starved by researchers, made nginx
`mirror` wait for it.

The rows of one concurrency are measured in --rounds rounds taken in turn, so that a change in
the machine's load falls on all of them alike; a proxy in `shadow` ends each round when its
shadow reads are done. It prints req/s, p50, p99, the proxy's CPU-µs per request (from /proc;
a shadow row's includes its shadow worker's) and ratios to direct; the CPU per request in
each process (proxy, shadow worker, both APIs, Postgres); the ledger's counts for the shadow
rows' measured requests (compared, matched, mismatched, dropped, skipped, errored); and the
goals' ratios, all against rows of the same run: shadow p99 / bascule p99 (target <= 1.10),
shadow req/s / mirror req/s at 32 (>= 1), shadow/slow p99 / mirror/slow p99 (< 1). No figure
is asserted.

    .venv/bin/python bench/proxy_overhead.py [--requests 6000] [--rows 1000] [--rounds 10]
        [--only direct,bascule,busy,traced,shadow,nginx,mirror,slow] [--concurrency 1,32]
        [--slow-requests 1500] [--delay 0.2] [--shadowed idle|equal] [--cpus split|shared]
        [--trace-ratio R]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from bascule.procs import ServerProcess, bascule_argv
from bascule.stages import Stage
from bascule.state.postgres import open_pool
from bascule.state.servers import (
    StoreEndpoints,
    create_database,
    database_url,
    free_port,
    provide_stores,
)
from bascule.state.stage_store import StageStore
from refapi.lab import PROXY_ENV, RESEARCHER_TOKEN, SERVICE_TOKEN, migrate_state, walk, write_config
from shadow.ledger import OUTCOMES, Ledger

TICKS = os.sysconf("SC_CLK_TCK")
LEDGER_SINCE = time.time() - 60
ROW_NAMES = ("direct", "bascule", "busy", "traced", "shadow", "nginx", "mirror", "slow")
UNTRACED = "\n[telemetry]\nenabled = false\n"
"""The `bascule` rows' proxies: no span, no metric (the baseline of `bascule/traced`)."""
MIX_DATASETS = ("dcir", "pmsi", "cepidc")
# Equal answers match: the reference API stamps each answer with the time it was served.
COMPARE_RULES = "".join(
    f'\n[datasets.{name}.compare]\nignore = ["/served_at"]\n' for name in MIX_DATASETS
)
PROCESSES = ("proxy", "shadow worker", "serving API", "shadowed API", "Postgres")
TARGET_DB = "bench_api_target"
SLOW_QUEUE = 100
"""shadow/slow's `[shadow] queue` (default 1000): full within a round, so that it shows what a
full queue does (drop, and count) without waiting seconds for a long queue to drain."""
SHADOW_COLUMNS = ("compared", "matched", "mismatched", "dropped", "skipped", "errored")


@dataclass
class Target:
    name: str
    url: str
    pid: int | None
    ledger: Ledger | None = None
    """A bascule proxy in `shadow`: its ledger, whose counts are read around each row."""
    busy: bool = False
    """Measured while a process per core at SCHED_IDLE burns the CPU researchers leave."""


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
    shadow: dict[str, int] | None = None
    """The ledger's counts for the row's measured requests (shadow rows only)."""
    by_process: dict[str, float] = field(default_factory=dict)
    """CPU µs per request in each process a request goes through (PROCESSES)."""


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a proxy's shadow worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def with_workers(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of a proxy and of its shadow worker, together."""
    if pid is None:
        return 0.0, 0.0
    user, system = cpu_seconds(pid)
    for child in children(pid):
        with contextlib.suppress(OSError):
            u, k = cpu_seconds(child)
            user, system = user + u, system + k
    return user, system


def start_burners(placement: Placement) -> list[subprocess.Popen[bytes]]:
    """A process per core spinning at SCHED_IDLE in a session of its own (the `bascule/busy`
    row): it takes only the CPU the researchers' path leaves, as the shadow worker and the
    shadowed side do, and shows what such work costs researchers on this machine by itself
    (cores that share caches, or a host's hyperthreads)."""
    burners = []
    for _ in range(os.cpu_count() or 1):
        burner = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time\nend = time.time() + 600\nwhile time.time() < end: pass",
            ],
            start_new_session=True,
        )
        idle_priority(burner.pid, session=True)
        placement.pin(burner.pid, "every")
        burners.append(burner)
    return burners


def threads(pid: int) -> list[int]:
    """The thread ids of a process (none once it has ended)."""
    try:
        return [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return []


def idle_priority(pid: int, *, session: bool = False) -> None:
    """SCHED_IDLE for a process and every thread it has (the shadowed side: see --shadowed).
    ``session``: it leads a session of its own (a server the bench started), whose autogroup
    the kernel weighs against the others' whatever its tasks' policy: that group at nice 19
    too. (A Postgres backend shares its server's group with the serving side's backends.)"""
    for thread in threads(pid):
        with contextlib.suppress(OSError):  # a thread that has just ended
            os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    if session:
        with contextlib.suppress(OSError):  # no autogroups on this kernel: nothing to weigh
            Path(f"/proc/{pid}/autogroup").write_text("19")


Side = Literal["researchers", "shadowed", "every"]


@dataclass(frozen=True)
class Placement:
    """The cores each side's processes run on (--cpus), and the shadowed side's priority
    (--shadowed).

    ``split`` (the default with 2 cores or more): the researchers' path (this load generator,
    the proxies, nginx, the serving API, its database sessions and the state databases') on the
    first half of the cores, and the other cloud (the shadowed API, its database sessions, the
    slow relay) with the proxies' shadow workers on the other half. ``shared``: every process
    on every core, as one machine running both clouds."""

    every: frozenset[int]
    researchers: frozenset[int] | None = None
    shadowed_cores: frozenset[int] | None = None
    idle: bool = False
    """The shadowed side at SCHED_IDLE (``--shadowed idle``)."""

    @classmethod
    def of(cls, mode: str, *, idle: bool) -> Placement:
        cores = sorted(os.sched_getaffinity(0))
        if mode == "shared" or len(cores) < 2:
            return cls(frozenset(cores), idle=idle)
        half = len(cores) // 2
        return cls(frozenset(cores), frozenset(cores[:half]), frozenset(cores[half:]), idle)

    def describe(self) -> str:
        if self.researchers is None or self.shadowed_cores is None:
            return f"every process on every core ({len(self.every)})"
        return (
            f"the researchers' path on cores {sorted(self.researchers)}, the shadowed side and "
            f"the shadow workers on cores {sorted(self.shadowed_cores)}"
        )

    def pin(self, pid: int | None, side: Side) -> None:
        """Every thread of ``pid`` onto ``side``'s cores."""
        cores = {"researchers": self.researchers, "shadowed": self.shadowed_cores}.get(
            side, self.every
        )
        if cores is None or pid is None:
            return
        for thread in threads(pid):
            with contextlib.suppress(OSError):  # a thread that has just ended
                os.sched_setaffinity(thread, cores)

    def shadowed(self, pid: int | None, *, session: bool = False) -> None:
        """A process of the other cloud: on its cores, at its priority (``session``: see
        :func:`idle_priority`)."""
        self.pin(pid, "shadowed")
        if pid is not None and self.idle:
            idle_priority(pid, session=session)


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


def session_for(concurrency: int) -> aiohttp.ClientSession:
    """A researcher's client: ``concurrency`` connections, kept across a row's rounds (idle ones
    closed after 30 s, before any server here closes them)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=30),
        headers={"Authorization": f"Bearer {RESEARCHER_TOKEN}"},
    )


async def load(
    session: aiohttp.ClientSession,
    base: str,
    mix: Sequence[tuple[str, str, bytes | None]],
    total: int,
    concurrency: int,
) -> tuple[list[float], int]:
    latencies: list[float] = []
    received = 0
    next_i = 0

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


async def ledger_counts(ledger: Ledger) -> dict[str, int]:
    """The ledger's counts over the mix's datasets, from a minute before this run began: a
    fixed start, so that two readings differ by what came in between (a start moving with
    the clock would drop an earlier run's bucket between them)."""
    totals: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
    for dataset in MIX_DATASETS:
        for outcome, n in (await ledger.counts(dataset, LEDGER_SINCE)).items():
            totals[outcome] += n
    return totals


def finished(counts: dict[str, int]) -> int:
    """Shadow reads with an outcome: every one ends matched, mismatched, skipped, errored or
    dropped (``compared`` counts the matched and mismatched again)."""
    return sum(n for outcome, n in counts.items() if outcome != "compared")


async def settle(
    ledger: Ledger, before: dict[str, int], sent: int | None, quiet: float = 5
) -> dict[str, int]:
    """Wait until the ``sent`` reads since ``before`` all have an outcome in the ledger (the
    proxy flushes its counts every second), or nothing moved for ``quiet`` seconds (what
    ``sent=None`` waits for); return the counts."""
    last, still_since = -1, time.monotonic()
    deadline = time.monotonic() + 120
    while True:
        counts = await ledger_counts(ledger)
        done = finished(counts) - finished(before)
        if (sent is not None and done >= sent) or time.monotonic() > deadline:
            return counts
        if done != last:
            last, still_since = done, time.monotonic()
        elif time.monotonic() - still_since > quiet:
            if sent is not None:
                print(f"  (only {done} of {sent} shadow reads accounted for)", file=sys.stderr)
            return counts
        await asyncio.sleep(0.25)


def shadow_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counts between two readings, every ``skipped_*`` outcome summed as ``skipped``."""
    d = {k: after[k] - before.get(k, 0) for k in after}
    delta = {k: d.get(k, 0) for k in SHADOW_COLUMNS}
    delta["skipped"] = sum(n for k, n in d.items() if k.startswith("skipped"))
    return delta


@dataclass
class Processes:
    """The processes besides the proxy that a request costs CPU in: both reference APIs, and
    Postgres (the backends connected to this run's databases)."""

    serving_api: int | None
    shadowed_api: int | None
    admin: asyncpg.Connection
    placement: Placement

    async def snapshot(self, proxy: int | None) -> dict[str, float]:
        """CPU seconds so far: per process name, Postgres per backend (``pg:PID``)."""
        backends = await self.admin.fetch(
            "SELECT pid, datname FROM pg_stat_activity WHERE datname LIKE 'bench\\_%'"
        )
        # Before every round: the APIs' pools may have opened sessions since, and a proxy
        # may have started its shadow worker again.
        for r in backends:
            if r["datname"] == TARGET_DB:
                self.placement.shadowed(r["pid"])
            else:
                self.placement.pin(r["pid"], "researchers")
        workers = children(proxy) if proxy else []
        for worker in workers:
            self.placement.pin(worker, "shadowed")
        pids = {
            "proxy": proxy,
            **{f"worker:{pid}": pid for pid in workers},
            "serving API": self.serving_api,
            "shadowed API": self.shadowed_api,
            **{f"pg:{r['pid']}": r["pid"] for r in backends},
        }
        seconds = {}
        for name, pid in pids.items():
            if pid is not None:
                with contextlib.suppress(OSError):  # a backend that has just ended
                    seconds[name] = sum(cpu_seconds(pid))
        return seconds


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Seconds spent between two snapshots, per process name (Postgres backends summed)."""
    spent: dict[str, float] = dict.fromkeys(PROCESSES, 0.0)
    for key, total in after.items():
        name = key
        if key.startswith("pg:"):
            name = "Postgres"
        elif key.startswith("worker:"):
            name = "shadow worker"
        spent[name] += total - before.get(key, 0.0)
    return spent


@dataclass
class Tally:
    """What the rounds of one row add up to."""

    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    received: int = 0
    user: float = 0.0
    system: float = 0.0
    shadow: dict[str, int] | None = None
    by_process: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PROCESSES, 0.0))


async def warm_up(
    session: aiohttp.ClientSession,
    target: Target,
    mix: Sequence[tuple[str, str, bytes | None]],
    concurrency: int,
) -> None:
    """Open the connections, warm pools and caches; for a proxy in `shadow`, until the
    warm-up's shadow reads are done too."""
    counts = await ledger_counts(target.ledger) if target.ledger else None
    await load(session, target.url, mix, 300, concurrency)
    if target.ledger and counts is not None:
        await settle(target.ledger, counts, 300)


async def measure(
    session: aiohttp.ClientSession,
    target: Target,
    mix: Sequence[tuple[str, str, bytes | None]],
    n: int,
    concurrency: int,
    tally: Tally,
    processes: Processes,
) -> None:
    """One round of ``n`` requests, added to ``tally``. For a proxy in `shadow`, the round
    ends when its shadow reads are done (their CPU time is the proxy's, and the next row must
    not pay for them); the rate counts the researchers' requests only."""
    counts = await ledger_counts(target.ledger) if target.ledger else None
    snapshot = await processes.snapshot(target.pid)
    before = with_workers(target.pid)
    burners = start_burners(processes.placement) if target.busy else []
    started = time.perf_counter()
    try:
        latencies, received = await load(session, target.url, mix, n, concurrency)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    tally.elapsed += time.perf_counter() - started
    tally.latencies += latencies
    tally.received += received
    if target.ledger and counts is not None:
        delta = shadow_delta(counts, await settle(target.ledger, counts, n))
        tally.shadow = {k: v + (tally.shadow or {}).get(k, 0) for k, v in delta.items()}
    if target.pid:
        after = with_workers(target.pid)
        tally.user += after[0] - before[0]
        tally.system += after[1] - before[1]
    for name, spent in cpu_spent(snapshot, await processes.snapshot(target.pid)).items():
        tally.by_process[name] += spent


async def measure_rows(
    targets: Sequence[Target],
    mix: Sequence[tuple[str, str, bytes | None]],
    total: int,
    concurrency: int,
    rounds: int,
    processes: Processes,
) -> list[Row]:
    """Every target warmed up, then measured in ``rounds`` rounds taken in turn, so that a
    change in the machine's load (other processes) falls on every row alike."""
    tallies = [Tally() for _ in targets]
    sizes = [total // rounds + (i < total % rounds) for i in range(rounds)]
    async with AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(session_for(concurrency)) for _ in targets]
        for session, target in zip(sessions, targets, strict=True):
            await warm_up(session, target, mix, concurrency)
        for n in sizes:
            for session, target, tally in zip(sessions, targets, tallies, strict=True):
                await measure(session, target, mix, n, concurrency, tally, processes)
    rows = []
    for target, t in zip(targets, tallies, strict=True):
        q = statistics.quantiles(t.latencies, n=100)
        cpu = share = None
        if target.pid:
            cpu = (t.user + t.system) / total * 1e6
            share = t.system / (t.user + t.system) if t.user + t.system else 0.0
        rows.append(
            Row(
                target.name,
                concurrency,
                total / t.elapsed,
                q[49] * 1e3,
                q[98] * 1e3,
                cpu,
                share,
                t.received / total,
                t.shadow,
                {name: spent / total * 1e6 for name, spent in t.by_process.items()},
            )
        )
    return rows


def nginx_conf(workdir: Path, servers: Sequence[tuple[int, str, str | None]]) -> Path:
    """One nginx process; a server per ``(port, serving URL, mirrored URL or None)``: a
    mirrored server also sends each request to the second URL and discards its answer."""
    names: dict[str, str] = {}
    for _, serving, mirrored in servers:
        for url in (serving, mirrored):
            if url is not None and url not in names:
                names[url] = f"u{len(names)}"
    upstreams = "".join(
        f"    upstream {name} {{ server {url.removeprefix('http://')}; keepalive 64; }}\n"
        for url, name in names.items()
    )
    proxied = 'proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host;'
    blocks = []
    for port, serving, mirrored in servers:
        mirror = mirror_location = ""
        if mirrored is not None:
            mirror = "mirror /_mirror; "
            mirror_location = (
                f"\n        location = /_mirror {{ internal;"
                f" proxy_pass http://{names[mirrored]}$request_uri; {proxied} }}"
            )
        blocks.append(
            f"    server {{\n        listen 127.0.0.1:{port};\n"
            f"        location / {{ {mirror}proxy_pass http://{names[serving]}; {proxied} }}"
            f"{mirror_location}\n    }}\n"
        )
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
master_process off;  # one process, so its CPU time is the proxying's
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
{upstreams}{"".join(blocks)}}}
"""
    )
    return conf


async def start_api(
    stack: AsyncExitStack, workdir: Path, name: str, database: str
) -> tuple[str, ServerProcess]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = ServerProcess(
        f"reference API {name}",
        bascule_argv("api", "--name", name, "--database", database, "--port", str(port)),
        f"{url}/healthz",
        workdir / f"api-{name}.log",
        {"BASCULE_API_TOKENS": f"{RESEARCHER_TOKEN},{SERVICE_TOKEN}"},
    )
    stack.push_async_callback(api.stop)
    await api.start()
    return url, api


async def start_bascule(
    stack: AsyncExitStack,
    workdir: Path,
    stores: StoreEndpoints,
    name: str,
    source_url: str,
    target_url: str,
    *,
    shadow: bool,
    extra: str = "",
) -> Target:
    """A `bascule proxy` with a state database of its own; in `shadow`: the mix's datasets
    moved source -> dualwrite -> shadow (as an SRE would), and its ledger to read counts."""
    state_db = await create_database(stores.postgres_url, f"bench_state_{name}", replace=True)
    await migrate_state(state_db)
    prefix = f"bench-{name}:"
    config = workdir / f"bascule-{name}.toml"
    cfg = write_config(
        config,
        source_url=source_url,
        target_url=target_url,
        postgres_url=state_db,
        redis_url=stores.redis_url,
        redis_prefix=prefix,
        extra=COMPARE_RULES + extra,
        shadow_worker=None,  # the product's default: a worker process
    )
    ledger = None
    if shadow:
        assert all(cfg.dataset(d).shadow_sample == 1.0 for d in MIX_DATASETS)
        pool = await open_pool(state_db, max_size=1)
        stack.push_async_callback(pool.close)
        store = StageStore(pool)
        for dataset in MIX_DATASETS:
            await walk(store, dataset, Stage.DUALWRITE, Stage.SHADOW, actor="bench")
        redis = aioredis.Redis.from_url(stores.redis_url)
        stack.push_async_callback(redis.aclose)
        ledger = Ledger(pool, redis, prefix)
    proxy = ServerProcess(
        f"bascule proxy {name}",
        bascule_argv("proxy", "--config", str(config)),
        f"http://{cfg.proxy.admin_listen}/readyz",
        workdir / f"proxy-{name}.log",
        PROXY_ENV,  # the journal keys: shadow reads need them (and writes, not sent here)
    )
    stack.push_async_callback(proxy.stop)
    await proxy.start()
    return Target(
        name, "http://" + cfg.proxy.listen, proxy.proc.pid if proxy.proc else None, ledger
    )


async def copy_database(admin_url: str, template: str, name: str) -> str:
    """A copy of database ``template`` (nobody connected to it) named ``name``."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()
    return database_url(admin_url, name)


async def main(args: argparse.Namespace) -> None:
    only = set(args.only)
    nginx = shutil.which("nginx")
    workdir = Path(tempfile.mkdtemp(prefix="bascule-bench-"))
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    placement = Placement.of(args.cpus, idle=args.shadowed == "idle")
    # First: every process this one starts, and every thread, inherits the researchers' cores.
    placement.pin(os.getpid(), "researchers")
    with provide_stores() as stores:
        api_db = await create_database(stores.postgres_url, "bench_api", replace=True)
        subprocess.run(
            bascule_argv("api", "seed", "--database", api_db, "--rows", str(args.rows)),
            check=True,
            capture_output=True,
        )
        wants_target = bool(only & {"shadow", "mirror", "slow"})
        # The shadowed side: identical data, so equal answers are expected.
        target_db = (
            await copy_database(stores.postgres_url, "bench_api", TARGET_DB)
            if wants_target
            else None
        )
        async with AsyncExitStack() as stack:
            api_url, api = await start_api(stack, workdir, "azure", api_db)
            target_url = slow_url = None
            shadowed_pid = None
            if target_db is not None:
                target_url, target_api = await start_api(stack, workdir, "scaleway", target_db)
                shadowed_pid = target_api.proc.pid if target_api.proc else None
                placement.shadowed(shadowed_pid, session=True)
            admin = await asyncpg.connect(stores.postgres_url)
            stack.push_async_callback(admin.close)
            processes = Processes(
                api.proc.pid if api.proc else None,
                shadowed_pid,
                admin,
                placement,
            )
            if "slow" in only and target_url is not None:
                port = free_port()
                slow_url = f"http://127.0.0.1:{port}"
                relay = ServerProcess(
                    "slow relay",
                    [
                        sys.executable,
                        str(Path(__file__).with_name("delay.py")),
                        "--port",
                        str(port),
                        "--backend",
                        target_url.removeprefix("http://"),
                        "--delay",
                        str(args.delay),
                    ],
                    f"{slow_url}/healthz",
                    workdir / "relay.log",
                )
                stack.push_async_callback(relay.stop)
                await relay.start()
                placement.shadowed(relay.proc.pid if relay.proc else None, session=True)
            targets: list[Target] = []
            slow: list[Target] = []
            if "direct" in only:
                targets.append(Target("direct", api_url, None))
            if "bascule" in only:
                source = await start_bascule(
                    stack,
                    workdir,
                    stores,
                    "bascule",
                    api_url,
                    api_url,
                    shadow=False,
                    extra=UNTRACED,
                )
                targets.append(source)
                if "busy" in only:
                    targets.append(Target("bascule/busy", source.url, source.pid, busy=True))
            sink_url = None
            if "traced" in only:
                port = free_port()
                sink_url = f"http://127.0.0.1:{port}"
                sink = ServerProcess(
                    "otlp sink",
                    [
                        sys.executable,
                        str(Path(__file__).with_name("otlp_sink.py")),
                        "--port",
                        str(port),
                    ],
                    f"{sink_url}/stats",
                    workdir / "otlp-sink.log",
                )
                stack.push_async_callback(sink.stop)
                await sink.start()
                placement.shadowed(sink.proc.pid if sink.proc else None, session=True)
                traced = await start_bascule(
                    stack,
                    workdir,
                    stores,
                    "traced",
                    api_url,
                    api_url,
                    shadow=False,
                    extra=(
                        f'\n[telemetry]\nexporter = "otlp-http"\nendpoint = "{sink_url}"\n'
                        + (f"sample_ratio = {args.trace_ratio}\n" if args.trace_ratio else "")
                    ),
                )
                traced.name = "bascule/traced"
                targets.append(traced)
            if "shadow" in only and target_url is not None:
                targets.append(
                    await start_bascule(
                        stack, workdir, stores, "shadow", api_url, target_url, shadow=True
                    )
                )
            if slow_url is not None:
                shadow_slow = await start_bascule(
                    stack,
                    workdir,
                    stores,
                    "slow",
                    api_url,
                    slow_url,
                    shadow=True,
                    extra=f"\n[shadow]\nqueue = {SLOW_QUEUE}\n",
                )
                shadow_slow.name = "shadow/slow"
                slow.append(shadow_slow)
            servers: dict[str, tuple[int, str, str | None]] = {}
            if nginx:
                if "nginx" in only:
                    servers["nginx"] = (free_port(), api_url, None)
                if "mirror" in only and target_url is not None:
                    servers["mirror"] = (free_port(), api_url, target_url)
                if slow_url is not None:
                    servers["mirror/slow"] = (free_port(), api_url, slow_url)
            if nginx and servers:
                for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                    (workdir / sub).mkdir()
                first = next(iter(servers.values()))[0]
                ngx = ServerProcess(
                    "nginx",
                    [
                        nginx,
                        "-c",
                        str(nginx_conf(workdir, list(servers.values()))),
                        "-p",
                        str(workdir),
                    ],
                    f"http://127.0.0.1:{first}/healthz",
                    workdir / "nginx.log",
                )
                stack.push_async_callback(ngx.stop)
                await ngx.start()
                pid = ngx.proc.pid if ngx.proc else None
                for name, (port, _, _) in servers.items():
                    (slow if name == "mirror/slow" else targets).append(
                        Target(name, f"http://127.0.0.1:{port}", pid)
                    )
            mix = request_mix(args.rows)
            if args.profile:
                chosen = next((t for t in targets + slow if t.name == args.profile_row), None)
                if chosen is None or chosen.pid is None:
                    raise SystemExit(f"--profile-row {args.profile_row}: not a proxy in this run")
                await profile(
                    args.profile,
                    chosen.pid,
                    chosen.url,
                    mix,
                    args.profile_concurrency,
                    placement,
                    native=args.profile_native,
                )
                if chosen.ledger is not None:  # its shadow backlog done before any row
                    await settle(chosen.ledger, await ledger_counts(chosen.ledger), None, quiet=2)
            rows = [
                row
                for c in concurrencies
                for row in await measure_rows(
                    targets, mix, args.requests, c, args.rounds, processes
                )
            ]
            rows += await measure_rows(
                slow, mix, args.slow_requests, args.slow_concurrency, args.rounds, processes
            )
            exported = None
            if sink_url is not None:
                async with aiohttp.ClientSession() as session:
                    async with session.get(f"{sink_url}/stats") as resp:
                        exported = await resp.json()
    report(rows, nginx is not None, args.delay, args.shadowed, placement)
    if exported is not None:
        print(f"  the OTLP sink took from bascule/traced: {exported}")


async def profile(
    out: str,
    pid: int,
    base: str,
    mix: Sequence[tuple[str, str, bytes | None]],
    concurrency: int,
    placement: Placement,
    *,
    native: bool = False,
) -> None:
    """Sample the proxy with py-spy (if installed) under load at ``concurrency``; ``native``:
    with the C frames (uvloop, httptools, the system calls) below the Python ones."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    proc = await asyncio.create_subprocess_exec(
        spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        "6",
        "--rate",
        "500",
        "--format",
        "raw",
        *(["--native"] if native else []),
        "-o",
        out,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    placement.pin(proc.pid, "shadowed")  # not on the cores of the proxy it samples
    await asyncio.sleep(0.5)
    deadline = time.monotonic() + 6
    async with session_for(concurrency) as session:
        while time.monotonic() < deadline:
            await load(session, base, mix, 500, concurrency)
    await proc.wait()
    print(f"py-spy samples of the proxy written to {out}")


def report(
    rows: list[Row], with_nginx: bool, delay: float, shadowed_side: str, placement: Placement
) -> None:
    print(
        f"\nproxy overhead — {rows[0].answer_bytes:.0f} B mean answer, "
        f"{os.cpu_count()} cores{'' if with_nginx else ' (nginx not on PATH: no peer rows)'}"
    )
    print(
        "the shadowed side (its API, database sessions, slow relay) at "
        + (
            "SCHED_IDLE, standing for the other cloud's machines"
            if shadowed_side == "idle"
            else "the serving side's priority"
        )
        + "; "
        + placement.describe()
    )
    head = (
        f"{'target':<12}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU µs/req':>12}"
        f"{'(kernel)':>9}{'req/s x':>9}{'+p50 ms':>9}{'p99 x':>7}"
    )
    print(head)
    print("-" * len(head))
    base = {r.concurrency: r for r in rows if r.name == "direct"}
    for r in rows:
        b = base.get(r.concurrency)
        cpu = f"{r.cpu_us:.0f}" if r.cpu_us is not None else "-"
        kernel = f"{r.sys_share:.0%}" if r.sys_share is not None else "-"
        ratios = (
            f"{r.rps / b.rps:>9.2f}{r.p50_ms - b.p50_ms:>+9.2f}{r.p99_ms / b.p99_ms:>7.2f}"
            if b is not None
            else f"{'-':>9}{'-':>9}{'-':>7}"
        )
        print(
            f"{r.name:<12}{r.concurrency:>5}{r.rps:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
            f"{cpu:>12}{kernel:>9}{ratios}"
        )
    if any(r.name.endswith("/slow") for r in rows):
        print(
            f"(slow: the shadowed API's answers handed on {delay * 1e3:.0f} ms late;"
            f" shadow/slow's [shadow] queue = {SLOW_QUEUE})"
        )
    print("\nCPU µs per request in each process (Postgres: this run's databases' backends)")
    print(f"{'target':<12}{'conc':>5}" + "".join(f"{p:>14}" for p in PROCESSES) + f"{'all':>10}")
    for r in rows:
        print(
            f"{r.name:<12}{r.concurrency:>5}"
            + "".join(f"{r.by_process.get(p, 0.0):>14.0f}" for p in PROCESSES)
            + f"{sum(r.by_process.values()):>10.0f}"
        )
    shadowed = [r for r in rows if r.shadow is not None]
    if shadowed:
        print("\nshadow reads of the measured requests (the ledger's counts in Redis)")
        print(f"{'target':<12}{'conc':>5}" + "".join(f"{c:>12}" for c in SHADOW_COLUMNS))
        for r in shadowed:
            assert r.shadow is not None
            print(
                f"{r.name:<12}{r.concurrency:>5}"
                + "".join(f"{r.shadow[c]:>12}" for c in SHADOW_COLUMNS)
            )
    by = {(r.name, r.concurrency): r for r in rows}
    print("\ngoals, against rows of this run")
    for c in sorted({r.concurrency for r in rows}):
        shadow, source, mirror = (
            by.get(("shadow", c)),
            by.get(("bascule", c)),
            by.get(("mirror", c)),
        )
        if shadow and source:
            ratio = shadow.p99_ms / source.p99_ms
            print(
                f"  concurrency {c:>2}: shadow p99 / bascule p99 = {ratio:.2f}"
                f" (target <= 1.10: {'met' if ratio <= 1.10 else 'missed'})"
            )
        traced = by.get(("bascule/traced", c))
        if traced and source and traced.cpu_us and source.cpu_us:
            ratio = traced.cpu_us / source.cpu_us
            verdict = "met" if ratio <= 1.15 else "missed"
            print(
                f"  concurrency {c:>2}: bascule/traced proxy CPU / bascule proxy CPU ="
                f" {ratio:.2f} per request (target <= 1.15: {verdict}),"
                f" p99 {traced.p99_ms / source.p99_ms:.2f}"
            )
        busy = by.get(("bascule/busy", c))
        if busy and source:
            print(
                f"  concurrency {c:>2}: bascule/busy p99 / bascule p99 ="
                f" {busy.p99_ms / source.p99_ms:.2f}, req/s {busy.rps / source.rps:.2f}"
                " (what idle-priority work alone costs researchers on this machine)"
            )
        if busy and shadow:
            print(
                f"  concurrency {c:>2}: shadow p99 / bascule/busy p99 ="
                f" {shadow.p99_ms / busy.p99_ms:.2f}, req/s {shadow.rps / busy.rps:.2f}"
                " (shadowing's cost beyond that)"
            )
        plain = by.get(("nginx", c))
        if mirror and plain:
            print(
                f"  concurrency {c:>2}: mirror p99 / nginx p99 = {mirror.p99_ms / plain.p99_ms:.2f}"
                " (the peer's own cost of shadowing, on this machine)"
            )
        if shadow and mirror:
            ratio = shadow.rps / mirror.rps
            verdict = f" (goal >= 1: {'met' if ratio >= 1 else 'missed'})" if c == 32 else ""
            print(
                f"  concurrency {c:>2}: shadow req/s / mirror req/s = {ratio:.2f}{verdict},"
                f" shadow p99 / mirror p99 = {shadow.p99_ms / mirror.p99_ms:.2f}"
            )
    slow_shadow = next((r for r in rows if r.name == "shadow/slow"), None)
    slow_mirror = next((r for r in rows if r.name == "mirror/slow"), None)
    if slow_shadow and slow_mirror:
        ratio = slow_shadow.p99_ms / slow_mirror.p99_ms
        print(
            f"  slow shadowed API, concurrency {slow_shadow.concurrency}:"
            f" shadow/slow p99 / mirror/slow p99 = {ratio:.2f}"
            f" (goal < 1: {'met' if ratio < 1 else 'missed'}),"
            f" shadow/slow req/s / mirror/slow req/s = {slow_shadow.rps / slow_mirror.rps:.2f}"
        )
        source = by.get(("bascule", slow_shadow.concurrency))
        if source:
            print(
                f"  slow shadowed API, concurrency {slow_shadow.concurrency}: shadow/slow p99 /"
                f" bascule p99 = {slow_shadow.p99_ms / source.p99_ms:.2f}, req/s"
                f" {slow_shadow.rps / source.rps:.2f} (a slow shadowed side should not show)"
            )
    print("  targets: proxy CPU <= 150 µs/request; added p50 <= 0.5 ms at concurrency 1")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000, help="per row (default 6000)")
    parser.add_argument("--rows", type=int, default=1000, help="rows per dataset (default 1000)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="rounds per row, the rows taking turns (default 10: a p99 from 3 rounds of 1000 "
        "moved by a quarter between runs here)",
    )
    parser.add_argument(
        "--only",
        type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
        default=list(ROW_NAMES),
        metavar="NAMES",
        help=f"rows to measure, comma-separated, among {','.join(ROW_NAMES)} (default all;"
        " slow is the pair shadow/slow and mirror/slow)",
    )
    parser.add_argument("--concurrency", default="1,32", help="comma-separated (default 1,32)")
    parser.add_argument(
        "--shadowed",
        choices=("idle", "equal"),
        default="idle",
        help="the shadowed API, its database sessions and the slow relay: at SCHED_IDLE "
        "(default; the other cloud's machines, which researchers' requests never share) or at "
        "the serving side's priority on the same cores",
    )
    parser.add_argument(
        "--cpus",
        choices=("split", "shared"),
        default="split",
        help="split (default, with 2 cores or more): the researchers' path on half the cores, "
        "the shadowed side and the proxies' shadow workers on the other half (the other "
        "cloud's machines, and the core a proxy host keeps for its worker); shared: every "
        "process on every core",
    )
    parser.add_argument(
        "--slow-requests", type=int, default=1500, help="per slow row (default 1500)"
    )
    parser.add_argument("--slow-concurrency", type=int, default=32)
    parser.add_argument(
        "--delay", type=float, default=0.2, help="seconds the slow API's answers are late"
    )
    parser.add_argument(
        "--trace-ratio",
        type=float,
        help="[telemetry] sample_ratio of the bascule/traced row (default: the configuration's)",
    )
    parser.add_argument("--profile", metavar="FILE", help="py-spy raw samples of a proxy")
    parser.add_argument(
        "--profile-row", default="bascule", help="the proxy to sample (default bascule)"
    )
    parser.add_argument("--profile-concurrency", type=int, default=32)
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native: C frames too (a system call's samples include the time the "
        "process waited for the core inside it, so they overstate its CPU)",
    )
    parsed = parser.parse_args()
    if unknown := set(parsed.only) - set(ROW_NAMES):
        parser.error(f"--only: unknown rows {sorted(unknown)} (known: {', '.join(ROW_NAMES)})")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(parsed))
