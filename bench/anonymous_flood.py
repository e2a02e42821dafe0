"""An anonymous flood: what clients without credentials cost the journal and researchers' writes.

One `bascule proxy` in front of two reference APIs, dcir in `dualwrite`. Researchers write
(PATCH of a random record's amount, with their token, ``--concurrency`` at once) in
alternating blocks of ``--seconds``: *quiet*, then *flood*, while ``--clients`` clients without
credentials POST ``--mb`` MB bodies to dcir in a loop (the backend refuses each: 401).
Printed, for each kind of block: the researchers' writes done, their p50 and p99; and what the
flood left in the journal: its growth on disk (``pg_total_relation_size``, TOAST included;
settled entries are kept for ``journal_retention``, 7 days by default) and the bytes of
requests journaled. The bench's databases are dropped at the end.

    .venv/bin/python bench/anonymous_flood.py [--seconds 15] [--blocks 2] [--clients 16]
        [--mb 10] [--require-credentials] [--anonymous-writes N]

Run it on two checkouts to compare them: it uses only what every version of the configuration
knows, unless ``--require-credentials`` or ``--anonymous-writes`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import asyncpg

from bascule.procs import ServerProcess, bascule_argv
from bascule.stages import Stage
from bascule.state.postgres import open_pool
from bascule.state.servers import create_database, drop_database, free_port, provide_stores
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


async def researchers(
    base: str, seconds: float, concurrency: int, rng: random.Random
) -> list[float]:
    """PATCHes with the researcher's token for ``seconds``; their latencies (s)."""
    latencies: list[float] = []
    until = time.perf_counter() + seconds
    async with aiohttp.ClientSession(
        headers=AUTH, connector=aiohttp.TCPConnector(limit=concurrency)
    ) as session:

        async def worker() -> None:
            while time.perf_counter() < until:
                rid = rng.randint(1, ROWS)
                started = time.perf_counter()
                async with session.patch(
                    f"{base}/v1/datasets/dcir/records/{rid}", json={"amount": rng.randint(1, 999)}
                ) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"a researcher's write answered {resp.status}")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def flood(
    base: str, clients: int, body: bytes, stop: asyncio.Event
) -> collections.Counter[int]:
    """``clients`` clients without credentials POSTing ``body`` until ``stop``; their answers."""
    answers: collections.Counter[int] = collections.Counter()

    async def client() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                try:
                    async with session.post(
                        f"{base}/v1/datasets/dcir/records",
                        data=body,
                        headers={"Content-Type": "application/json"},
                    ) as resp:
                        await resp.read()
                        answers[resp.status] += 1
                        if resp.status == 429:
                            await asyncio.sleep(
                                0.05
                            )  # as a client honouring Retry-After would, sooner
                except aiohttp.ClientError:
                    answers[0] += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return answers


def quantiles(latencies: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(latencies, n=100)
    return q[49] * 1e3, q[98] * 1e3


async def journal_size(conn: asyncpg.Connection) -> tuple[int, int]:
    """(bytes on disk, bytes of journaled requests)."""
    row = await conn.fetchrow(
        "SELECT pg_total_relation_size('bascule_journal') AS disk,"
        " coalesce(sum(octet_length(request)), 0) AS requests FROM bascule_journal"
    )
    assert row is not None
    return int(row["disk"]), int(row["requests"])


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bascule-bench-flood-"))
    body = b'{"pad": "' + b"x" * (args.mb * 1024 * 1024) + b'"}'
    with provide_stores() as stores:
        src = await create_database(stores.postgres_url, "bench_flood_src", replace=True)
        tgt = await create_database(stores.postgres_url, "bench_flood_tgt", replace=True)
        state = await create_database(stores.postgres_url, "bench_flood_state", replace=True)
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
            redis_prefix="bench-flood:",
            read_timeout=10.0,
            max_body_bytes=len(body) + 1024,
        )
        added = "require_credentials = true\n" if args.require_credentials else ""
        if args.anonymous_writes:
            added += f"anonymous_writes = {args.anonymous_writes}\n"
        config.write_text(config.read_text().replace("[proxy]\n", f"[proxy]\n{added}"))
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
            for server in (api("azure", src, ports["src"]), api("scaleway", tgt, ports["tgt"])):
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
            base = f"http://{cfg.proxy.listen}"
            journal = await asyncpg.connect(state)
            stack.push_async_callback(journal.close)
            pool = await open_pool(state, max_size=1)
            await walk(StageStore(pool), "dcir", Stage.DUALWRITE, actor="bench", reason="b")
            await pool.close()
            await asyncio.sleep(1.5)  # the proxy polls the new stage
            rng = random.Random(1)
            await researchers(base, 2.0, args.concurrency, rng)  # warm up
            samples: dict[str, list[float]] = {"quiet": [], "flood": []}
            answers: collections.Counter[int] = collections.Counter()
            grown = requests = 0
            flooded = 0.0
            for _ in range(args.blocks):
                samples["quiet"] += await researchers(base, args.seconds, args.concurrency, rng)
                disk, journaled = await journal_size(journal)
                stop = asyncio.Event()
                flooding = spawn(flood(base, args.clients, body, stop), name="flood")
                await asyncio.sleep(0.5)  # the flood under way
                started = time.perf_counter()
                samples["flood"] += await researchers(base, args.seconds, args.concurrency, rng)
                flooded += time.perf_counter() - started
                stop.set()
                answers += await flooding
                after, journaled_after = await journal_size(journal)
                grown += after - disk
                requests += journal_after_minus(journaled_after, journaled)
        for name in ("bench_flood_src", "bench_flood_tgt", "bench_flood_state"):
            await drop_database(stores.postgres_url, name)
    quiet, loud = quantiles(samples["quiet"]), quantiles(samples["flood"])
    mb = 1024 * 1024
    print(
        f"\nanonymous flood — {args.clients} clients without credentials POSTing {args.mb} MB,"
        f" researchers PATCHing at concurrency {args.concurrency};"
        f" {args.blocks} alternating blocks of {args.seconds:g} s"
        + ("; require_credentials = true" if args.require_credentials else "")
        + (f"; anonymous_writes = {args.anonymous_writes}" if args.anonymous_writes else "")
    )
    print(f"{'researchers':<14}{'writes':>8}{'p50 ms':>9}{'p99 ms':>9}")
    print(f"{'quiet':<14}{len(samples['quiet']):>8}{quiet[0]:>9.2f}{quiet[1]:>9.2f}")
    print(f"{'under flood':<14}{len(samples['flood']):>8}{loud[0]:>9.2f}{loud[1]:>9.2f}")
    statuses = ", ".join(f"{s or 'broken'}: {n}" for s, n in sorted(answers.items()))
    print(f"anonymous answers in {flooded:.1f} s of flood: {statuses}")
    print(
        f"journal growth over the floods: {grown / mb:.1f} MB on disk,"
        f" {requests / mb:.1f} MB of journaled requests"
    )


def journal_after_minus(after: int, before: int) -> int:
    return max(0, after - before)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each block")
    parser.add_argument("--blocks", type=int, default=2, help="alternating blocks of each kind")
    parser.add_argument("--concurrency", type=int, default=4, help="researchers at once")
    parser.add_argument("--clients", type=int, default=16, help="anonymous clients")
    parser.add_argument("--mb", type=int, default=10, help="size of each anonymous body")
    parser.add_argument(
        "--require-credentials", action="store_true", help="[proxy] require_credentials = true"
    )
    parser.add_argument(
        "--anonymous-writes", type=int, default=0, help="[proxy] anonymous_writes (0: default)"
    )
    asyncio.run(main(parser.parse_args()))
