"""What dual write costs a researcher's write, and how fast a backlog drains.

One run measures, with the same writes (PATCH of one record's amount, concurrency 1):
  direct      the source reference API itself (the baseline)
  dualwrite   through `bascule proxy` with dcir in `dualwrite` (lock, intent, call, outcome)
in alternating blocks, so that both see the same machine (on a shared 2-core machine the load
of other processes drifts within a minute); each dualwrite block includes its replays to the
target, and the next direct block starts once they are done. Then it measures the target API's
own keyed-write capacity (concurrency 32, the replay's baseline), and builds a backlog: the
target is stopped, N writes go through the proxy (concurrency 32), the target comes back, and
the time to replay the whole backlog gives the replay rate; then a second backlog drains into
bench/sink.py, a backend that stores nothing: the replayer's ceiling.

    .venv/bin/python bench/dual_write.py [--writes 500] [--backlog 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import asyncpg

from bascule.procs import ServerProcess, bascule_argv
from bascule.stages import Stage
from bascule.state.postgres import open_pool
from bascule.state.servers import create_database, free_port, provide_stores
from bascule.state.stage_store import StageStore
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


async def open_entries(conn: asyncpg.Connection) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM bascule_journal WHERE state IN ('intent', 'pending')"
    )
    return count


async def settled(conn: asyncpg.Connection, poll: float = 0.2) -> None:
    while await open_entries(conn):
        await asyncio.sleep(poll)


async def drained(conn: asyncpg.Connection) -> float:
    """Seconds until no entry is open, from now; the outage's backoff released first. One
    connection polls (a connection per poll would cost the server a process each time)."""
    await conn.execute(  # measure replay, not the retry delays the outage built up
        "UPDATE bascule_journal SET next_attempt_at = now() WHERE state = 'pending'"
    )
    started = time.perf_counter()
    await settled(conn, 0.05)
    return time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bascule-bench-dw-"))
    with provide_stores() as stores:
        src = await create_database(stores.postgres_url, "bench_dw_src", replace=True)
        tgt = await create_database(stores.postgres_url, "bench_dw_tgt", replace=True)
        state = await create_database(stores.postgres_url, "bench_dw_state", replace=True)
        for db in (src, tgt):
            proc = await asyncio.create_subprocess_exec(
                *bascule_argv("api", "seed", "--database", db, "--rows", str(ROWS)),
                stdout=asyncio.subprocess.DEVNULL,
            )
            await proc.wait()
        await migrate_state(state)
        ports = {"src": free_port(), "tgt": free_port()}
        config = workdir / "bascule.toml"
        cfg = write_config(
            config,
            source_url=f"http://127.0.0.1:{ports['src']}",
            target_url=f"http://127.0.0.1:{ports['tgt']}",
            postgres_url=state,
            redis_url=stores.redis_url,
            redis_prefix="bench-dw:",
            read_timeout=10.0,
        )
        api_env = {"BASCULE_API_TOKENS": f"{RESEARCHER_TOKEN},{SERVICE_TOKEN}"}

        def api(name: str, db: str, port: int) -> ServerProcess:
            return ServerProcess(
                name,
                bascule_argv("api", "--name", name, "--database", db, "--port", str(port)),
                f"http://127.0.0.1:{port}/healthz",
                workdir / f"{name}.log",
                api_env,
            )

        async with AsyncExitStack() as stack:
            source, target = api("azure", src, ports["src"]), api("scaleway", tgt, ports["tgt"])
            for server in (source, target):
                stack.push_async_callback(server.stop)
                await server.start()
            proxy = ServerProcess(
                "bascule proxy",
                bascule_argv("proxy", "--config", str(config)),
                f"http://{cfg.proxy.admin_listen}/readyz",
                workdir / "proxy.log",
                PROXY_ENV,
            )
            stack.push_async_callback(proxy.stop)
            await proxy.start()
            proxy_url = f"http://{cfg.proxy.listen}"

            journal = await asyncpg.connect(state)
            stack.push_async_callback(journal.close)
            pool = await open_pool(state, max_size=1)
            store = StageStore(pool)
            await walk(store, "dcir", Stage.DUALWRITE, actor="bench", reason="b")
            await pool.close()
            await asyncio.sleep(1.5)  # the proxy polls the new stage
            direct_url = f"http://127.0.0.1:{ports['src']}"
            await writes(direct_url, 100, 1)  # warm up
            await writes(proxy_url, 100, 1)
            await settled(journal)
            samples: dict[str, list[float]] = {"direct": [], "dualwrite": []}
            per_block = max(1, args.writes // args.blocks)
            for _ in range(args.blocks):
                samples["direct"] += await writes(direct_url, per_block, 1)
                samples["dualwrite"] += await writes(proxy_url, per_block, 1)
                await settled(journal, 0.02)  # its replays belong to the dualwrite block
            direct, dual = quantiles(samples["direct"]), quantiles(samples["dualwrite"])

            # The baseline of the replay rate: how fast the target API itself takes keyed
            # writes from 32 clients. A replayer cannot apply faster than the side it writes to.
            started = time.perf_counter()
            await writes(f"http://127.0.0.1:{ports['tgt']}", args.backlog, 32, keyed=True)
            capacity = args.backlog / (time.perf_counter() - started)

            await target.stop()
            started = time.perf_counter()
            await writes(proxy_url, args.backlog, 32)
            fill = time.perf_counter() - started
            backlog = await open_entries(journal)
            await target.start()
            drain = await drained(journal)

            # The same again into a backend that stores nothing: the replayer's own ceiling.
            await target.stop()
            await writes(proxy_url, args.backlog, 32)
            sink_backlog = await open_entries(journal)
            sink = ServerProcess(
                "sink",
                [
                    sys.executable,
                    str(Path(__file__).with_name("sink.py")),
                    "--port",
                    str(ports["tgt"]),
                ],
                f"http://127.0.0.1:{ports['tgt']}/",
                workdir / "sink.log",
            )
            stack.push_async_callback(sink.stop)
            await sink.start()
            sink_drain = await drained(journal)

    print(
        f"\ndual write — PATCH of one record, {ROWS} records, 2 cores; "
        f"{args.blocks} alternating blocks of each path"
    )
    print(f"{'path':<12}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}")
    print(f"{'direct':<12}{direct[0]:>9.2f}{direct[1]:>9.2f}{0:>+9.2f}")
    print(f"{'dualwrite':<12}{dual[0]:>9.2f}{dual[1]:>9.2f}{dual[0] - direct[0]:>+9.2f}")
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=500, help="per latency row")
    parser.add_argument("--blocks", type=int, default=10, help="alternating blocks per row")
    parser.add_argument("--backlog", type=int, default=10_000, help="writes in the backlog")
    asyncio.run(main(parser.parse_args()))
