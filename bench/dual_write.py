"""What dual write costs a researcher's write: throughput under load, latency, replay rate.

Throughput (``--seconds`` a run, at each ``--concurrency``, ``--repeats`` times, rows
alternated so that all see the same drift of a shared machine): PATCH of random records by
``concurrency`` clients at once,
  direct to the source API             the baseline
  naive dual write                     the client PATCHes the source, then the target, itself
  bascule dualwrite                    dcir in `dualwrite` through `bascule proxy`
  bascule live                         pmsi in `live` (the target is the authority)
  bascule target down                  dcir in `dualwrite`, the target API stopped
each with the CPU per write of every process (client, proxy, each API, and the Postgres
backends of each database, from /proc/PID/stat) over the run and its replays. Then each
proxied row again with the proxy's state sessions through a relay that counts their round
trips on the wire (bench/lab.py). ``--baseline CHECKOUT``: the proxied rows also for a proxy
run from another checkout (its own world), in the same run: before and after.

Cores (``--cores shared,split``): every row twice, alternated. ``shared``: every process on
both cores, as the issue measured: each row is then bound by the CPU all its processes spend
per write (the ``all`` column; ``naive/all`` is the most a row could reach against the naive
dual write). ``split``: the world as it is (the client, both APIs, their databases' Postgres
backends) on core 0, bascule (its proxy, its state database's backends) on core 1, as deployed
on machines of its own: whether bascule keeps up with the backends (docs/decisions.md).
Pinning another user's processes needs root; without it the split rows are left out.

Latency (first, on a settled machine; concurrency 1, ``--writes`` in ``--blocks`` alternating
blocks): direct and through
the proxy in `dualwrite`, each dualwrite block with its replays. Then the target API's own
keyed-write capacity (concurrency 32, the replay's baseline), and a backlog: the target is
stopped, ``--backlog`` writes go through the proxy (concurrency 32), the target comes back,
and the time to replay the whole backlog gives the replay rate; then a second backlog drains
into bench/sink.py, a backend that stores nothing: the replayer's ceiling.

    .venv/bin/python bench/dual_write.py [--seconds 5] [--repeats 2] [--concurrency 32,128]
        [--cores shared,split] [--sessions 16] [--writes 500] [--backlog 10000]
        [--baseline /path/to/main]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from contextlib import AbstractAsyncContextManager, AsyncExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from bascule.procs import ServerProcess
from bascule.stages import Stage
from bench.lab import ROWS, Cores, Cpu, Lab, RoundTrips, lab, start, table
from refapi.lab import AUTH


async def writes(base: str, count: int, concurrency: int, *, keyed: bool = False) -> list[float]:
    """PATCH random records; ``keyed``: each with its own Idempotency-Key, as replays are."""
    latencies: list[float] = []
    done = 0
    rng = random.Random(1)
    async with aiohttp.ClientSession(
        headers=AUTH, connector=aiohttp.TCPConnector(limit=concurrency)
    ) as session:

        async def worker() -> None:
            nonlocal done
            while done < count:
                done += 1
                rid = rng.randint(1, ROWS)
                headers = {"Idempotency-Key": f"bench:{done}:{rid}"} if keyed else None
                started = time.perf_counter()
                async with session.patch(
                    f"{base}/v1/datasets/dcir/records/{rid}",
                    json={"amount": rng.randint(1, 999)},
                    headers=headers,
                ) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"write answered {resp.status}")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def quantiles(latencies: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(latencies, n=100)
    return q[49] * 1e3, q[98] * 1e3


async def drained(world: Lab) -> float:
    """Seconds until no entry is open, from now; the outage's backoff released first (measure
    replay, not the retry delays the outage built up)."""
    await world.release_backoff()
    started = time.perf_counter()
    await world.settled(0.05)
    return time.perf_counter() - started


async def load(
    paths: list[str], seconds: float, concurrency: int, rng: random.Random
) -> list[float]:
    """``concurrency`` clients PATCHing random records for ``seconds``, each write at every URL
    of ``paths`` in turn (``{rid}``: the record), as one client's write; their latencies."""
    latencies: list[float] = []
    until = time.perf_counter() + seconds
    async with aiohttp.ClientSession(
        headers=AUTH, connector=aiohttp.TCPConnector(limit=concurrency * len(paths))
    ) as session:

        async def worker() -> None:
            while time.perf_counter() < until:
                rid = rng.randint(1, ROWS)
                value = rng.randint(1, 999)
                started = time.perf_counter()
                for path in paths:
                    body = {"tariff" if "/pmsi/" in path else "amount": value}
                    async with session.patch(path.format(rid=rid), json=body) as resp:
                        text = await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"{path} answered {resp.status}: {text[:300]!r}")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


Key = tuple[str, int]
"""(how the cores are shared, concurrency)."""

SPLIT = "split"
SHARED = "shared"
CORES = {
    SHARED: "every process on both cores, as on one 2-core machine",
    SPLIT: "core 0: the client, both APIs and their databases' Postgres backends (the world as"
    " it is); core 1: bascule's proxy and its state database's backends (bascule's own"
    " machine, as deployed)",
}


@dataclass
class Row:
    """One path of the throughput table: where its writes go, and whether the target is down."""

    name: str
    world: Lab
    paths: list[str]
    down: bool = False
    proxied: bool = True
    rates: dict[Key, list[float]] = field(default_factory=dict)
    p50: dict[Key, list[float]] = field(default_factory=dict)
    cpu: dict[Key, list[dict[str, float]]] = field(default_factory=dict)
    """Per (cores, concurrency), per run: CPU ms per write, per process."""
    drain: dict[Key, list[float]] = field(default_factory=dict)


def records(base: str, dataset: str) -> str:
    return f"{base}/v1/datasets/{dataset}/records/{{rid}}"


def rows_of(world: Lab, worlds: dict[str, Lab]) -> list[Row]:
    rows = [
        Row("direct to the source API", world, [records(world.source_url, "dcir")], proxied=False),
        Row(
            "naive dual write (client)",
            world,
            [records(world.source_url, "dcir"), records(world.target_url, "dcir")],
            proxied=False,
        ),
    ]
    for label, w in worlds.items():
        rows.append(Row(f"bascule dualwrite{label}", w, [records(w.proxy_url, "dcir")]))
    for label, w in worlds.items():
        rows.append(Row(f"bascule live{label}", w, [records(w.proxy_url, "pmsi")]))
    for label, w in worlds.items():
        rows.append(Row(f"bascule target down{label}", w, [records(w.proxy_url, "dcir")], True))
    return rows


def meter(world: Lab) -> Cpu:
    def pid(server: Any) -> int:
        return int(server.proc.pid) if server.proc is not None else 0

    processes = {"client": -os.getpid(), "proxy": pid(world.proxy), "source API": pid(world.source)}
    if world.target.proc is not None and world.target.proc.returncode is None:
        processes["target API"] = pid(world.target)
    names = {side: url.rsplit("/", 1)[1] for side, url in world.databases.items()}
    return Cpu(
        world.journal,
        processes,
        {"pg state": names["state"], "pg source": names["src"], "pg target": names["tgt"]},
    )


def cores(world: Lab, mode: str) -> AbstractAsyncContextManager[Any]:
    """The run's processes pinned as ``mode`` says (:data:`CORES`)."""
    if mode == SHARED:
        return nullcontext()
    servers = [s.proc.pid for s in (world.source, world.target) if s.proc is not None]
    names = {side: url.rsplit("/", 1)[1] for side, url in world.databases.items()}
    assert world.proxy.proc is not None
    return Cores(
        world.admin_url,
        [
            ({0}, [-os.getpid(), *servers], [names["src"], names["tgt"]]),
            ({1}, [world.proxy.proc.pid], [names["state"]]),
        ],
    )


async def run_row(
    row: Row, mode: str, concurrency: int, seconds: float, rng: random.Random
) -> None:
    world = row.world
    if row.down:
        await world.target.stop()
    cpu = meter(world)
    async with cores(world, mode):
        await cpu.start()
        started = time.perf_counter()
        latencies = await load(row.paths, seconds, concurrency, rng)
        elapsed = time.perf_counter() - started
        drain = 0.0
        if not row.down:
            await world.settled(0.02)  # its replays belong to the row
            drain = time.perf_counter() - started - elapsed
        used = await cpu.stop()
    if row.down:
        await start(world.target)
        await drained(world)
    count = len(latencies)
    key = (mode, concurrency)
    row.rates.setdefault(key, []).append(count / elapsed)
    row.p50.setdefault(key, []).append(statistics.median(latencies) * 1e3)
    row.cpu.setdefault(key, []).append({k: v * 1e3 / count for k, v in used.items()})
    row.drain.setdefault(key, []).append(drain)


async def throughput(world: Lab, worlds: dict[str, Lab], args: argparse.Namespace) -> None:
    rows = rows_of(world, worlds)
    rng = random.Random(2)
    modes = list(args.cores)
    if SPLIT in modes and (why := Cores.possible()) is not None:
        print(f"(no split-cores rows: {why})")
        modes.remove(SPLIT)
    for row in rows:  # warm up
        if not row.down:
            await load(row.paths, 1.0, 8, rng)
    for w in worlds.values():
        await w.settled()
    for _ in range(args.repeats):
        for concurrency in args.concurrency:
            for mode in modes:
                for row in rows:  # alternating: every row sees the same drift of the machine
                    await run_row(row, mode, concurrency, args.seconds, rng)
    print(
        f"\nwrite throughput — PATCH of random records among {ROWS}, {args.seconds:g} s a run, "
        f"{args.repeats} runs of each row, alternated; journal_sessions = {args.sessions},"
        f" reference API pools: {args.api_pool}"
    )
    print("CPU: ms per write, per process (its children included; Postgres: the backends of")
    print("its database), over the run and its replays; drain: s after the run until replayed")
    for mode in modes:
        print(f"\ncores {mode}: {CORES[mode]}")
        for concurrency in args.concurrency:
            print_rows(rows, (mode, concurrency))
    print("\ntargets: dualwrite >= 0.7x naive at concurrency 32; target down >= 0.9x target up")
    if SHARED in modes:
        print(
            "on shared cores every row is bound by the CPU all its processes use per write (the"
            " 'all' column): the most a path can reach there is naive's 'all' / its own"
        )


def print_rows(rows: list[Row], key: Key) -> None:
    naive = statistics.median(rows[1].rates[key])
    names = list(rows[0].cpu[key][0])
    for row in rows:
        for name in row.cpu[key][0]:
            if name not in names:
                names.append(name)
    headers = ["concurrency " + str(key[1]), "writes/s", "x naive", "p50 ms", "drain s"]
    lines = []
    naive_cpu = sum(statistics.median(run.get(n, 0.0) for run in rows[1].cpu[key]) for n in names)
    for row in rows:
        rate = statistics.median(row.rates[key])
        spread = f"{min(row.rates[key]):.0f}-{max(row.rates[key]):.0f}"
        cpu = {n: statistics.median(run.get(n, 0.0) for run in row.cpu[key]) for n in names}
        lines.append(
            [
                row.name,
                spread,
                f"{rate / naive:.2f}",
                f"{statistics.median(row.p50[key]):.1f}",
                f"{max(row.drain[key]):.1f}",
                *(f"{cpu[n]:.2f}" for n in names),
                f"{sum(cpu.values()):.2f}",
                f"{naive_cpu / sum(cpu.values()):.2f}",
            ]
        )
    print()
    print(table([*headers, *names, "all", "naive/all"], lines))
    for row in (r for r in rows if r.down):
        up = next(r for r in rows if r.world is row.world and r.proxied and r is not row)
        ratio = statistics.median(row.rates[key]) / statistics.median(up.rates[key])
        print(f"{row.name}: {ratio:.2f}x {up.name}")


async def round_trips(worlds: dict[str, Lab], args: argparse.Namespace) -> None:
    """Each proxied row again, its proxy's state sessions through a relay that counts their
    round trips (not timed: the relay costs CPU of its own)."""
    rng = random.Random(3)
    lines = []
    for label, world in worlds.items():
        async with RoundTrips() as relay:
            await world.restart_proxy(relay.url(world.databases["state"]))
            await asyncio.sleep(1.0)
            before = relay.count
            await asyncio.sleep(2.0)
            idle = (relay.count - before) / 2.0
            for concurrency in args.concurrency:
                counted = [
                    ("dualwrite", records(world.proxy_url, "dcir"), False),
                    ("live", records(world.proxy_url, "pmsi"), False),
                    ("target down", records(world.proxy_url, "dcir"), True),
                ]
                for name, path, down in counted:
                    await load([path], 1.0, 8, rng)
                    await world.settled()
                    if down:
                        await world.target.stop()
                    before = relay.count
                    writes = len(await load([path], args.count_seconds, concurrency, rng))
                    if not down:
                        await world.settled(0.02)
                    trips = relay.count - before
                    lines.append(
                        [f"{name}{label}", str(concurrency), str(writes), f"{trips / writes:.2f}"]
                    )
                    if down:
                        await start(world.target)
                        await drained(world)
            lines.append([f"idle{label}", "-", "-", f"{idle:.1f}/s"])
        await world.restart_proxy()
    print("\nstate-database round trips per write, counted on the wire (Query and Sync messages")
    print("of the proxy's sessions; replays and their polling included; idle: with no writes)")
    print(table(["path", "concurrency", "writes", "round trips/write"], lines))


async def latency_and_replay(world: Lab, worlds: dict[str, Lab], args: argparse.Namespace) -> None:
    direct_url = world.source_url
    await writes(direct_url, 100, 1)  # warm up
    for w in worlds.values():
        await writes(w.proxy_url, 100, 1)
        await w.settled()
    samples: dict[str, list[float]] = {"direct": []}
    per_block = max(1, args.writes // args.blocks)
    for _ in range(args.blocks):
        samples["direct"] += await writes(direct_url, per_block, 1)
        for label, w in worlds.items():
            samples.setdefault(f"dualwrite{label}", [])
            samples[f"dualwrite{label}"] += await writes(w.proxy_url, per_block, 1)
            await w.settled(0.02)  # its replays belong to the dualwrite block
    figures = {name: quantiles(latencies) for name, latencies in samples.items()}
    proxy_url = world.proxy_url

    # The baseline of the replay rate: how fast the target API itself takes keyed
    # writes from 32 clients. A replayer cannot apply faster than the side it writes to.
    started = time.perf_counter()
    await writes(world.target_url, args.backlog, 32, keyed=True)
    capacity = args.backlog / (time.perf_counter() - started)

    await world.target.stop()
    started = time.perf_counter()
    await writes(proxy_url, args.backlog, 32)
    fill = time.perf_counter() - started
    backlog = await world.open_entries()
    await start(world.target)
    drain = await drained(world)

    # The same again into a backend that stores nothing: the replayer's own ceiling.
    await world.target.stop()
    await writes(proxy_url, args.backlog, 32)
    sink_backlog = await world.open_entries()
    sink = ServerProcess(
        "sink",
        [
            sys.executable,
            str(Path(__file__).with_name("sink.py")),
            "--port",
            str(world.ports["tgt"]),
        ],
        f"{world.target_url}/",
        world.workdir / "sink.log",
    )
    try:
        await sink.start()
        sink_drain = await drained(world)
    finally:
        await sink.stop()
    await start(world.target)

    print(
        f"\ndual write — PATCH of one record, {ROWS} records, 2 cores; "
        f"{args.blocks} alternating blocks of each path"
    )
    direct = figures["direct"]
    print(f"{'path':<22}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}")
    for name, (p50, p99) in figures.items():
        print(f"{name:<22}{p50:>9.2f}{p99:>9.2f}{p50 - direct[0]:>+9.2f}")
    print(
        f"\nbacklog: {backlog} writes accepted in {fill:.1f}s with the target down "
        f"({args.backlog / fill:.0f} writes/s through the proxy, concurrency 32)"
    )
    print(f"replay into the target API: drained in {drain:.1f}s = {backlog / drain:.0f} writes/s")
    print(
        f"  the target API alone, keyed PATCHes from 32 clients: {capacity:.0f} writes/s; "
        f"replay/target = {backlog / drain / capacity:.2f}"
    )
    print(
        f"replay into a sink that stores nothing (bench/sink.py): {sink_backlog} writes in "
        f"{sink_drain:.1f}s = {sink_backlog / sink_drain:.0f} writes/s (the replayer's ceiling)"
    )
    print("\ntargets: added p50 <= 3 ms; replay >= 2,000 writes/s")


async def main(args: argparse.Namespace) -> None:
    stages = {"dcir": Stage.DUALWRITE, "pmsi": Stage.LIVE}
    async with AsyncExitStack() as labs:
        world = await labs.enter_async_context(
            lab("bench_dw", stages, journal_sessions=args.sessions, api_pool=args.api_pool)
        )
        worlds = {"": world}
        if args.baseline:
            worlds = {
                " (before)": await labs.enter_async_context(
                    lab(
                        "bench_dw0",
                        stages,
                        journal_sessions=args.sessions,
                        repo=Path(args.baseline),
                        apis=world,
                    )
                ),
                " (after)": world,
            }
        # Latency first: right after the throughput part the server is still taking in its
        # tens of thousands of fresh journal entries, and concurrency 1 measured that
        # (docs/decisions.md).
        if args.writes > 0:
            await latency_and_replay(world, worlds, args)
        if args.seconds > 0:
            await throughput(world, worlds, args)
        if args.count_seconds > 0:
            await round_trips(worlds, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=500, help="per latency row")
    parser.add_argument("--blocks", type=int, default=10, help="alternating blocks per row")
    parser.add_argument("--backlog", type=int, default=10_000, help="writes in the backlog")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput run (0: none)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each throughput row")
    parser.add_argument(
        "--concurrency", type=lambda t: [int(c) for c in t.split(",")], default=[32, 128]
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=16,
        help="[state] journal_sessions: writes in flight per replica (bascule's default is 3,"
        " for ten replicas on one server's connections; docs/operations.md)",
    )
    parser.add_argument(
        "--api-pool", type=int, default=10, help="database connections of each reference API"
    )
    parser.add_argument(
        "--count-seconds", type=float, default=3.0, help="per round-trip counting run (0: none)"
    )
    parser.add_argument(
        "--cores",
        type=lambda t: t.split(","),
        default=[SHARED, SPLIT],
        help="shared, split or both (split pins processes to cores: root only)",
    )
    parser.add_argument(
        "--baseline", default="", help="another checkout: its proxy's rows too, in the same run"
    )
    asyncio.run(main(parser.parse_args()))
