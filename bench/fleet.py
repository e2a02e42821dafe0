"""A fleet of `bascule proxy` replicas: flip propagation, throughput per worker, sessions.

1. **Flip propagation**, measured at the replicas: three replicas (processes) run; each flip of
   dcir (dualwrite <-> shadow) is committed to the stage table by this process, as the
   switcher commits it, then announced on Redis; each replica notes (wall clock, the same
   machine's) when it first read the new version (``/readyz`` ``applied_at``), and the
   propagation is that minus the moment the commit returned here (so it leaves out the commit
   acknowledgement's own few tens of microseconds). p50, p99, max over ``--flips`` flips x 3
   replicas; with Redis up, then with Redis down (the replicas' Redis is a closed port: they
   learn by polling the stage table every ``--poll-interval`` s, so the bound there is the poll
   interval). Flips are spaced by a random pause so that they fall anywhere in a poll cycle.
2. **Throughput** of one replica with ``--workers 1`` then 2, behind one load generator (this
   process, aiohttp, ``--concurrency`` kept-alive connections): reads (GET a record, served by
   the source) and writes (PATCH a record in ``dualwrite``: locks, intent, call, outcome, replay),
   ``--duration`` s each, in ``--rounds`` rounds taken in turn (the machine's load drifts).
   The machine's cores are shared by the load generator, the proxy's
   workers, both reference APIs and Postgres: the figures show where that limit sits.
3. **State-Postgres sessions** of that replica (``pg_stat_activity`` on the state database, by
   ``application_name``), at rest and the most seen under each load, per worker (each worker is
   a replica of its own), and of the three-replica fleet at rest.

    .venv/bin/python bench/fleet.py [--flips 50] [--poll-interval 1.0] [--duration 8]
                                    [--concurrency 64] [--parts flips,workers]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from bascule.procs import ServerProcess, bascule_argv
from bascule.stages import Stage
from bascule.state.fleet import RedisAnnouncer
from bascule.state.postgres import open_pool
from bascule.state.servers import create_database, free_port, free_ports, provide_stores
from bascule.state.stage_store import StageStore
from bascule.tasks import spawn
from refapi.lab import (
    AUTH,
    PROXY_ENV,
    RESEARCHER_TOKEN,
    SERVICE_TOKEN,
    migrate_state,
    walk,
    write_config,
)

ROWS = 2000
REPLICAS = 3
PREFIX = "bench-fleet:"


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """p50, p99, max in ms."""
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return q[49] * 1e3, q[98] * 1e3, max(samples) * 1e3


def proxy(
    workdir: Path, config: Path, name: str, env: dict[str, str], workers: int = 1
) -> tuple[ServerProcess, str, str]:
    port, admin = free_ports(2)
    argv = bascule_argv(
        "--log-level",
        "WARNING",
        "proxy",
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
        "--admin-listen",
        f"127.0.0.1:{admin}",
        "--workers",
        str(workers),
    )
    admin_url = f"http://127.0.0.1:{admin}"
    proc = ServerProcess(name, argv, f"{admin_url}/readyz", workdir / f"{name}.log", env)
    return proc, f"http://127.0.0.1:{port}", admin_url


async def flips(
    state: str,
    redis_url: str,
    admins: list[str],
    count: int,
    pause: tuple[float, float],
) -> list[float]:
    """``count`` flips of dcir; each replica's delay from the commit to its reading it (s)."""
    pool = await open_pool(state, max_size=1)
    client = aioredis.Redis.from_url(redis_url)
    store, announcer = StageStore(pool), RedisAnnouncer(client, PREFIX)
    delays: list[float] = []
    rng = random.Random(7)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(count):
                await asyncio.sleep(rng.uniform(*pause))
                row = await store.get("dcir")
                wanted = Stage.SHADOW if row.stage is Stage.DUALWRITE else Stage.DUALWRITE
                new = await store.change("dcir", row.version, wanted, actor="bench", reason="b")
                committed = time.time()
                await announcer.announce(new)  # what the switcher does next
                for admin in admins:
                    while True:
                        async with session.get(f"{admin}/readyz") as resp:
                            detail = await resp.json()
                        if detail["versions"].get("dcir") == new.version:
                            delays.append(detail["applied_at"]["dcir"] - committed)
                            break
                        await asyncio.sleep(0.005)
    finally:
        await client.aclose()
        await pool.close()
    return delays


async def sessions(conn: asyncpg.Connection, state_db: str) -> Counter[str]:
    """The state database's sessions but this one's, by application_name."""
    rows = await conn.fetch(
        "SELECT coalesce(nullif(application_name, ''), '(unnamed)') AS app, count(*) AS n"
        " FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()"
        " GROUP BY 1",
        state_db,
    )
    return Counter({_kind(r["app"]): r["n"] for r in rows})


def _kind(app: str) -> str:
    """An application_name without the replica's name in it (writers are named per replica)."""
    return "writers" if app.startswith("bascule writer") else app


async def load(
    url: str, kind: str, duration: float, concurrency: int
) -> tuple[int, int, list[float]]:
    """(answers 2xx, others or failures, latencies) of ``concurrency`` clients for
    ``duration`` s."""
    ok = bad = 0
    latencies: list[float] = []
    end = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(headers=AUTH, connector=connector) as session:

        async def client(n: int) -> None:
            nonlocal ok, bad
            rng = random.Random(n)
            while time.monotonic() < end:
                rid = rng.randint(1, ROWS)
                started = time.perf_counter()
                url_ = f"{url}/v1/datasets/dcir/records/{rid}"
                try:
                    if kind == "reads":
                        request = session.get(url_)
                    else:
                        rid = 1 + n  # one writer per record: no lock waits between them
                        request = session.patch(
                            f"{url}/v1/datasets/dcir/records/{rid}",
                            json={"amount": rng.randint(1, 999)},
                        )
                    async with request as resp:
                        await resp.read()
                        if 200 <= resp.status < 300:
                            ok += 1
                            latencies.append(time.perf_counter() - started)
                        else:
                            bad += 1
                except aiohttp.ClientError:
                    bad += 1

        await asyncio.gather(*(client(n) for n in range(concurrency)))
    return ok, bad, latencies


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def family(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bascule-bench-fleet-"))
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start;"
        f" logs in {workdir}"
    )
    with provide_stores() as stores:
        src = await create_database(stores.postgres_url, "bench_fleet_src", replace=True)
        tgt = await create_database(stores.postgres_url, "bench_fleet_tgt", replace=True)
        state = await create_database(stores.postgres_url, "bench_fleet_state", replace=True)
        state_name = state.rsplit("/", 1)[1].split("?")[0]
        for db in (src, tgt):
            seeding = await asyncio.create_subprocess_exec(
                *bascule_argv("api", "seed", "--database", db, "--rows", str(ROWS)),
                stdout=asyncio.subprocess.DEVNULL,
            )
            await seeding.wait()
        await migrate_state(state)
        ports = {"src": free_port(), "tgt": free_port()}
        config = workdir / "bascule.toml"
        write_config(
            config,
            source_url=f"http://127.0.0.1:{ports['src']}",
            target_url=f"http://127.0.0.1:{ports['tgt']}",
            postgres_url=state,
            redis_url=stores.redis_url,
            redis_prefix=PREFIX,
            read_timeout=10.0,
            poll_interval=args.poll_interval,
            stale_after=max(30.0, 3 * args.poll_interval),
        )
        api_env = {"BASCULE_API_TOKENS": f"{RESEARCHER_TOKEN},{SERVICE_TOKEN}"}
        watcher = await asyncpg.connect(stores.postgres_url)
        results: list[str] = []
        async with AsyncExitStack() as stack:
            stack.push_async_callback(watcher.close)
            for name, db, port in (("azure", src, ports["src"]), ("scaleway", tgt, ports["tgt"])):
                api = ServerProcess(
                    name,
                    bascule_argv("api", "--name", name, "--database", db, "--port", str(port)),
                    f"http://127.0.0.1:{port}/healthz",
                    workdir / f"{name}.log",
                    api_env,
                )
                stack.push_async_callback(api.stop)
                await api.start()
            pool = await open_pool(state, max_size=1)
            await walk(StageStore(pool), "dcir", Stage.DUALWRITE, actor="bench", reason="b")
            await pool.close()

            # 1. Flip propagation, Redis up then down.
            closed = f"redis://127.0.0.1:{free_port()}/0"
            for mode, redis_env, pause in (
                ("Redis up", {}, (0.05, 0.25)),
                ("Redis down", {"BASCULE_REDIS_URL": closed}, (0.0, args.poll_interval)),
            ):
                if "flips" not in args.parts:
                    break
                env = {**PROXY_ENV, **redis_env}
                fleet = [
                    proxy(workdir, config, f"replica{i}-{mode[-2:].strip()}", env)
                    for i in range(REPLICAS)
                ]
                async with AsyncExitStack() as replicas:
                    for proc, _, _ in fleet:
                        replicas.push_async_callback(proc.stop)
                        await proc.start()
                    await asyncio.sleep(2 * args.poll_interval)
                    at_rest = await sessions(watcher, state_name)
                    delays = await flips(
                        state, stores.redis_url, [a for _, _, a in fleet], args.flips, pause
                    )
                p50, p99, worst = quantiles(delays)
                results.append(
                    f"flip propagation, {mode:10}: p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  "
                    f"max {worst:7.1f} ms  ({args.flips} flips x {REPLICAS} replicas; "
                    f"poll_interval {args.poll_interval:g} s)"
                )
                print(results[-1], flush=True)
                if mode == "Redis up":
                    results.append(
                        f"sessions of {REPLICAS} replicas at rest: {sum(at_rest.values())} "
                        f"({sum(at_rest.values()) / REPLICAS:.1f} per replica) "
                        f"{dict(sorted(at_rest.items()))}"
                    )
                    print(results[-1], flush=True)

            # 2 and 3. Throughput and sessions: a replica with 1 worker and one with 2, both
            # up, measured in turn, round after round (the machine's load drifts: it falls on
            # both alike); the sessions of each on its own state database.
            if "workers" in args.parts:
                results += await throughput(args, workdir, config, stores.postgres_url, state)
    results.append(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print("\n".join(["", "summary:", *results]))


@dataclass
class Tally:
    ok: int = 0
    bad: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    generator: float = 0.0
    latencies: list[float] = field(default_factory=list)
    peak: Counter[str] = field(default_factory=Counter)


async def throughput(
    args: argparse.Namespace, workdir: Path, config: Path, server: str, state: str
) -> list[str]:
    lines: list[str] = []
    variants = (1, 2)
    procs: dict[int, tuple[ServerProcess, str]] = {}
    watcher = await asyncpg.connect(server)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(watcher.close)
        names: dict[int, str] = {}
        for workers in variants:
            # Each its own state database, so that its sessions can be told apart.
            db = await create_database(server, f"bench_fleet_state{workers}", replace=True)
            await migrate_state(db)
            pool = await open_pool(db, max_size=1)
            await walk(StageStore(pool), "dcir", Stage.DUALWRITE, actor="bench", reason="b")
            await pool.close()
            names[workers] = db.rsplit("/", 1)[1].split("?")[0]
            env = {**PROXY_ENV, "BASCULE_POSTGRES_URL": db}
            proc, url, _ = proxy(workdir, config, f"workers{workers}", env, workers)
            stack.push_async_callback(proc.stop)
            await proc.start()
            procs[workers] = (proc, url)
        await asyncio.sleep(3.0)  # every worker up and polling
        for workers in variants:
            rest = await sessions(watcher, names[workers])
            lines.append(
                f"--workers {workers}: state sessions at rest {sum(rest.values())} "
                f"({sum(rest.values()) / workers:.1f} per worker) {dict(sorted(rest.items()))}"
            )
            print(lines[-1], flush=True)
            await load(procs[workers][1], "reads", 1.0, args.concurrency)  # warm up
        tallies = {(w, k): Tally() for w in variants for k in ("reads", "writes")}
        for _ in range(args.rounds):
            for kind in ("reads", "writes"):
                for workers in variants:
                    proc, url = procs[workers]
                    tally = tallies[workers, kind]
                    assert proc.proc is not None
                    pids = family(proc.proc.pid)
                    cpu0, mine0 = cpu_seconds(pids), time.process_time()
                    stop = asyncio.Event()

                    async def sample(
                        db: str = names[workers], t: Tally = tally, stop: asyncio.Event = stop
                    ) -> None:
                        while not stop.is_set():
                            now = await sessions(watcher, db)
                            if sum(now.values()) > sum(t.peak.values()):
                                t.peak.clear()
                                t.peak.update(now)
                            await asyncio.sleep(0.2)

                    sampler = spawn(sample(), name="sessions")
                    started = time.perf_counter()
                    ok, bad, lat = await load(
                        url, kind, args.duration / args.rounds, args.concurrency
                    )
                    tally.seconds += time.perf_counter() - started
                    stop.set()
                    await sampler
                    tally.cpu += cpu_seconds(pids) - cpu0
                    tally.generator += time.process_time() - mine0
                    tally.ok, tally.bad = tally.ok + ok, tally.bad + bad
                    tally.latencies += lat
    for kind in ("reads", "writes"):
        base = tallies[1, kind]
        for workers in variants:
            t = tallies[workers, kind]
            rate = t.ok / t.seconds
            p50, p99, _ = quantiles(t.latencies)
            lines.append(
                f"--workers {workers}: {kind:6} {rate:7.0f} req/s "
                f"(x{rate / (base.ok / base.seconds):.2f} of 1 worker)  p50 {p50:6.1f} ms  "
                f"p99 {p99:6.1f} ms  errors {t.bad}  proxy CPU {t.cpu / t.seconds:.2f} cores "
                f"({t.cpu / max(t.ok, 1) * 1e6:.0f} us/request), load generator "
                f"{t.generator / t.seconds:.2f} cores; state sessions at most "
                f"{sum(t.peak.values())} {dict(sorted(t.peak.items()))}"
            )
            print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flips", type=int, default=50)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="throughput rounds, in turn")
    parser.add_argument(
        "--parts", default="flips,workers", help="what to measure: flips, workers or both"
    )
    try:
        asyncio.run(main(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(130)
