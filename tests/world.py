"""One test world: two reference APIs over seeded databases, the state stores, and N proxy
replicas in front (in this process, or ``bascule proxy`` processes), faults where a test wants.

Modelled on asyncpg's ``_testbase``: real servers, and a TCP proxy in front of what a test
wants to break (:class:`tests.faults.FaultProxy`). ``async with build_world(ground, ...) as
world:`` builds it and tears it all down; ``world.to_stage(...)`` walks a dataset through
stages; the helpers below it (``researchers``, ``table_digest``...) are what the dual-write,
shadow and fleet tests share.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import aiohttp
import asyncpg
import msgspec
from aiohttp import web

from bascule.app.admin import create_admin_app
from bascule.app.replica import Replica
from bascule.config import Config, Secrets, SwitchSettings
from bascule.procs import ServerProcess, bascule_argv
from bascule.stages import Stage
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageStore
from cutover.switch import Switcher, switcher_for
from refapi.lab import AUTH, PROXY_ENV, migrate_state, walk, write_config
from refapi.seed import seed_database
from shadow.ledger import divergence
from tests.conftest import Ground
from tests.faults import FaultProxy, fault_proxy
from tests.harness import (
    Hook,
    RestartableRefapi,
    dcir_record,
    fetch,
    relay,
    serve_app,
    serve_proxy,
    start_proxy,
)

Line = Literal["source", "target", "postgres", "redis"]
SIDES: tuple[Line, Line] = ("source", "target")
Backend = str | web.Application
"""A backend a world is given: its URL, or an app the world serves."""
Fake = Callable[[str], web.Application]
"""Makes the app that stands for a backend, given its name (``azure``, ``scaleway``)."""

RULES = """
[datasets.dcir.compare]
ignore = ["/served_at"]
unordered = { "/records" = "id" }
"""
"""Comparison rules for shadow reads of the reference API: ``served_at`` is volatile by
design, and a page's records are matched by id."""

PLANTED = "ZQPLANTED31337"
"""A recognisable value a test plants in a divergent row, to look for where it must not be."""

MakeWorld = Callable[..., Awaitable["World"]]
"""A fixture's factory of worlds, each torn down with the test."""

SHADOWED = (Stage.DUALWRITE, Stage.SHADOW)
LIVE = (Stage.DUALWRITE, Stage.SHADOW, Stage.LIVE)

log = logging.getLogger("tests.world")


@dataclass(frozen=True)
class Hooks:
    """Fault injection in front of what the replicas reach.

    ``source``, ``target``: an HTTP hook answering every request to that backend
    (:func:`tests.harness.relay`), for a test that rewrites an answer after the backend
    committed (a 504, a gzipped body), delays some requests, or answers without forwarding.
    ``faults``: the lines with a :class:`FaultProxy` in front, as ``world.faults[line]``
    (latency, reset, cut, blackhole, heal). In front of a backend it serves every replica; in
    front of the state Postgres or Redis, the replicas in ``faulted`` (None: all), while the
    test's own sessions reach the stores directly.
    """

    source: Hook | None = None
    target: Hook | None = None
    faults: Collection[Line] = ()
    faulted: Collection[int] | None = None

    def reaches_through(self, line: Line, replica: int) -> bool:
        return line in self.faults and (self.faulted is None or replica in self.faulted)


@dataclass
class World:
    """What :func:`build_world` built. In-process replicas are in ``replicas``, processes in
    ``procs``; either way ``proxies`` and ``admin_urls`` are their ports, in order."""

    config_path: Path
    config: Config
    state_db: str
    redis_url: str
    proxies: list[str] = field(default_factory=list)
    admin_urls: list[str] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)
    procs: list[ServerProcess] = field(default_factory=list)
    faults: dict[Line, FaultProxy] = field(default_factory=dict)
    source_url: str = ""
    """The source backend as the test reaches it: directly, before any hook or fault."""
    target_url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    """What every proxy process is started with, on top of this process's environment."""
    apis: tuple[RestartableRefapi, RestartableRefapi] | None = None
    source_db: str = ""
    """The source reference API's database ("" when the backends are not reference APIs)."""
    target_db: str = ""
    started: float = field(default_factory=lambda: time.time() - 1)

    @property
    def proxy(self) -> str:
        return self.proxies[0]

    @property
    def replica(self) -> Replica:
        return self.replicas[0]

    @property
    def source(self) -> RestartableRefapi:
        """The source reference API: ``stop()`` and ``start()`` it on the same port."""
        return self._apis()[0]

    @property
    def target(self) -> RestartableRefapi:
        return self._apis()[1]

    def _apis(self) -> tuple[RestartableRefapi, RestartableRefapi]:
        assert self.apis is not None, "this world's backends are not reference APIs"
        return self.apis

    def switcher(self, pool: asyncpg.Pool, settings: SwitchSettings) -> Switcher:
        """The switcher `bascule stage` builds from this world's configuration (its ``ids``
        and databases), with the test's ``settings``, on the test's ``pool``."""
        return switcher_for(msgspec.structs.replace(self.config, switch=settings), pool)

    async def to_stage(
        self, *stages: Stage, dataset: str = "dcir", seen_by: Collection[int] | None = None
    ) -> None:
        """Walk ``dataset`` through ``stages`` in the store (set-up, whatever the rules), then
        make sure the replicas in ``seen_by`` (None: all; ``()``: none, as a replica that missed
        it) run the last one: an in-process replica reloads its view, a process is waited for."""
        if not stages:
            return
        pool = await open_pool(self.state_db, max_size=1)
        try:
            await walk(StageStore(pool), dataset, *stages)
        finally:
            await pool.close()
        chosen = range(len(self.proxies)) if seen_by is None else sorted(seen_by)
        if self.replicas:
            for i in chosen:
                await self.replicas[i].view.reload()
        else:
            await replicas_see([self.admin_urls[i] for i in chosen], dataset, stages[-1])

    async def drained(self, within: float = 30.0) -> dict[str, int]:
        """Wait for no entry left to replay; the journal's counts by state."""
        conn = await asyncpg.connect(self.state_db)
        try:
            deadline = time.monotonic() + within
            while True:
                rows = await conn.fetch(
                    "SELECT state, count(*) AS n FROM bascule_journal GROUP BY state"
                )
                counts = {r["state"]: r["n"] for r in rows}
                if not any(counts.get(s) for s in ("intent", "pending")):
                    return counts
                if time.monotonic() > deadline:
                    raise AssertionError(f"backlog not drained in {within}s: {counts}")
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    async def settled(self) -> dict[str, int]:
        """Every shadow read of every replica done and counted: dcir's counts in the ledger
        since the world began."""
        for replica in self.replicas:
            assert replica.shadow is not None
            await replica.shadow.join()
        assert self.replica.shadow is not None
        return await self.replica.shadow.ledger.counts("dcir", self.started)

    async def mismatches(self) -> list[dict[str, Any]]:
        """dcir's divergence, as ``bascule divergence`` lists it."""
        pool = await open_pool(self.state_db, max_size=1)
        try:
            return await divergence(pool, "dcir")
        finally:
            await pool.close()

    async def sql(self, database: str, statement: str, *args: Any) -> list[asyncpg.Record]:
        """Run ``statement`` on ``database`` behind bascule's back; its rows."""
        return await fetch(database, statement, *args)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``bascule ARGS`` on this world's configuration, as an SRE would."""
        return subprocess.run(
            bascule_argv(*args),
            env={**os.environ, **self.env, "BASCULE_CONFIG": str(self.config_path)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@asynccontextmanager
async def build_world(
    ground: Ground,
    *,
    replicas: int = 1,
    processes: bool = False,
    stages: Sequence[Stage] = (),
    hooks: Hooks | None = None,
    rows: int = 20,
    seed: int = 7,
    source_idem: bool = True,
    target_idem: bool = True,
    backends: tuple[Backend, Backend] | Fake | None = None,
    postgres_url: str | None = None,
    redis_url: str | None = None,
    shadow_worker: str | None = "inline",
    ids: bool = False,
    rules: str = "",
    extra: str = "",
    poll_interval: float = 0.5,
    stale_after: float = 30.0,
    orphan_grace: float = 5.0,
    read_timeout: float = 5.0,
    write_timeout: float | None = None,
    backend_extra: str = "",
    idempotent_creates: bool = False,
    env: Mapping[str, str] | None = None,
    failpoints: Sequence[str | None] = (),
    open_gate: bool = True,
    controller_interval: float = 3600.0,
    dead_session_after: float = 30.0,
    workers: int = 1,
    prestop_seconds: float = 0.0,
) -> AsyncIterator[World]:
    """Two reference APIs (``azure`` the source, ``scaleway`` the target) over databases seeded
    alike (``rows`` dcir rows from ``seed``; 0: not seeded), or the ``backends`` given (URLs,
    apps the world serves, or a maker of an app by backend name); a
    migrated state database (the ground's, or ``postgres_url``); ``replicas`` replicas over
    them, in this process or as ``processes``; ``hooks`` in front; dcir walked through
    ``stages``.

    ``source_idem``/``target_idem``: the API honours Idempotency-Key. ``shadow_worker``,
    ``ids`` (an authority switch moves dcir's ids past the other side's), ``rules`` and
    ``extra`` (appended to the configuration), ``backend_extra`` (in both backends' tables) and
    the timings: the configuration's (:func:`refapi.lab.write_config`). ``env``: the
    environment of every process; ``failpoints``: ``BASCULE_FAILPOINT`` of each process in
    turn. ``open_gate``, ``controller_interval``: as :func:`refapi.lab.write_config` (a gate
    that holds whatever the evidence, and a controller that stays idle, unless a test asks
    otherwise); ``dead_session_after``: ``[state] dead_session_after``; ``workers`` (each
    process's ``--workers``) and ``prestop_seconds``: ``[proxy]``'s.
    """
    hooks = hooks or Hooks()
    state_db = postgres_url or ground.pg_url
    stores_redis = redis_url or ground.redis_url
    databases: tuple[str, str] | None = None
    if callable(backends):
        backends = (backends("azure"), backends("scaleway"))
    if backends is None:
        databases = (await ground.make_database("src"), await ground.make_database("tgt"))
        if rows:
            for db in databases:
                await seed_database(db, rows, seed=seed)
    await migrate_state(state_db)
    async with AsyncExitStack() as stack:
        apis: tuple[RestartableRefapi, RestartableRefapi] | None = None
        if databases is not None:
            apis = (
                await stack.enter_async_context(
                    RestartableRefapi("azure", databases[0], honour_idempotency=source_idem)
                ),
                await stack.enter_async_context(
                    RestartableRefapi("scaleway", databases[1], honour_idempotency=target_idem)
                ),
            )
            backends = (apis[0].url, apis[1].url)
        assert backends is not None
        urls = [
            b if isinstance(b, str) else await stack.enter_async_context(serve_app(b))
            for b in backends
        ]
        reached: dict[Line, str] = {"source": urls[0], "target": urls[1]}
        for side, hook in zip(SIDES, (hooks.source, hooks.target), strict=True):
            if hook is not None:
                reached[side] = await stack.enter_async_context(relay(reached[side], hook))
        faults: dict[Line, FaultProxy] = {}
        upstreams: dict[Line, str] = {
            "source": reached["source"],
            "target": reached["target"],
            "postgres": state_db,
            "redis": stores_redis,
        }
        for line in hooks.faults:
            faults[line] = await stack.enter_async_context(fault_proxy(upstreams[line]))
        for side in SIDES:
            if side in faults:
                reached[side] = faults[side].url(reached[side])

        config_path = ground.tmp_path / "bascule.toml"
        config = write_config(
            config_path,
            source_url=reached["source"],
            target_url=reached["target"],
            postgres_url=state_db,
            redis_url=stores_redis,
            redis_prefix=ground.redis_prefix,
            poll_interval=poll_interval,
            stale_after=stale_after,
            orphan_grace=orphan_grace,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            backend_extra=backend_extra,
            idempotent_creates=idempotent_creates,
            databases=databases if ids else None,
            extra=rules + extra,
            shadow_worker=shadow_worker,
            open_gate=open_gate,
            controller_interval=controller_interval,
            dead_session_after=dead_session_after,
            prestop_seconds=prestop_seconds,
        )
        world = World(
            config_path,
            config,
            state_db,
            stores_redis,
            faults=faults,
            source_url=urls[0],
            target_url=urls[1],
            env={**PROXY_ENV, **(env or {})},
            apis=apis,
            source_db=databases[0] if databases else "",
            target_db=databases[1] if databases else "",
        )

        def store_urls(i: int) -> tuple[str, str]:
            """The state Postgres and Redis as replica ``i`` reaches them."""
            pg, rd = state_db, stores_redis
            if hooks.reaches_through("postgres", i):
                pg = faults["postgres"].url(pg)
            if hooks.reaches_through("redis", i):
                rd = faults["redis"].url(rd)
            return pg, rd

        if processes:
            for i in range(replicas):
                pg, rd = store_urls(i)
                # The environment overrides the configured stores (bascule/state/servers.py).
                own = {**world.env, "BASCULE_POSTGRES_URL": pg, "BASCULE_REDIS_URL": rd}
                point = failpoints[i] if i < len(failpoints) else None
                if point:
                    own["BASCULE_FAILPOINT"] = point
                log = ground.tmp_path / f"proxy{i}.log"
                started = await start_proxy(stack, config_path, log, own, workers)
                world.procs.append(started.proc)
                world.proxies.append(started.url)
                world.admin_urls.append(started.admin_url)

            def resume_all() -> None:
                # A frozen process (SIGSTOP) is resumed before it is stopped: SIGTERM waits.
                for proc in world.procs:
                    proc.signal(signal.SIGCONT)

            stack.callback(resume_all)
        else:
            secrets = Secrets.from_env({**os.environ, **PROXY_ENV})
            for i in range(replicas):
                pg, rd = store_urls(i)
                replica = await stack.enter_async_context(
                    Replica(config, secrets, pg, rd, name=f"replica-{i}")
                )
                world.replicas.append(replica)
                world.proxies.append(await stack.enter_async_context(serve_proxy(replica.server())))
                admin = create_admin_app(replica.admin_deps())
                world.admin_urls.append(await stack.enter_async_context(serve_app(admin)))
        # Runs first: a partition left by the test ends (its sessions reset) so that the
        # replicas close at once rather than waiting on silent connections.
        stack.callback(end_partitions, faults.values())
        await world.to_stage(*stages)
        yield world


def shadow_world(ground: Ground, **options: Any) -> AbstractAsyncContextManager[World]:
    """:func:`build_world` as the shadow tests have it: 50 identical rows (seed 11), dcir in
    `shadow` unless ``stages`` says otherwise, the reference API's comparison rules (``rules``
    replaces them, ``extra`` adds to them)."""
    options.setdefault("stages", SHADOWED)
    options.setdefault("rules", RULES)
    return build_world(ground, rows=50, seed=11, **options)


def end_partitions(proxies: Collection[FaultProxy]) -> None:
    for proxy in proxies:
        if proxy.silent:
            proxy.reset()
        proxy.heal()


# --- What the dual-write, shadow and fleet tests share ------------------------------------------


async def replicas_see(admin_urls: Sequence[str], dataset: str, stage: Stage) -> None:
    """Wait until every replica's /readyz reports ``dataset`` in ``stage``."""
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession() as session:
        for admin in admin_urls:
            while True:
                async with session.get(f"{admin}/readyz") as resp:
                    seen = (await resp.json()).get("stages", {}).get(dataset)
                if seen == stage.value:
                    break
                assert time.monotonic() < deadline, f"{admin} still sees {dataset} in {seen}"
                await asyncio.sleep(0.1)


async def table_digest(database_url: str, table: str = "dcir") -> tuple[int, str]:
    """A table's row count and a digest of every row: equal digests, identical tables."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            f"SELECT count(*) AS n, md5(coalesce(string_agg(t::text, '|' ORDER BY t.id), ''))"
            f" AS digest FROM {table} t"
        )
        assert row is not None
        return row["n"], row["digest"]
    finally:
        await conn.close()


async def amount(db: str, rid: int) -> Decimal | None:
    """dcir record ``rid``'s amount in ``db`` (None: no such record)."""
    conn = await asyncpg.connect(db)
    try:
        value: Decimal | None = await conn.fetchval("SELECT amount FROM dcir WHERE id = $1", rid)
        return value
    finally:
        await conn.close()


async def get(session: aiohttp.ClientSession, url: str) -> int:
    """GET ``url``; the status (the body read and dropped)."""
    async with session.get(url) as resp:
        await resp.read()
        return resp.status


async def query(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    """POST a query; the status."""
    async with session.post(url, json=body) as resp:
        await resp.read()
        return resp.status


def researcher_write(
    session: aiohttp.ClientSession,
    base: str,
    rng: random.Random,
    records: int,
    n: int,
    i: int,
) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
    """One write of the researchers' mix on ``records`` shared records of dcir: a PUT, two
    PATCHes, a DELETE and a create in five. ``n``: the writer, ``i``: its write."""
    rid = rng.randint(1, records)
    op = rng.choice(["put", "patch", "patch", "delete", "create"])
    if op == "put":
        return session.put(f"{base}/{rid}", json={"id": rid, **dcir_record(rid, i)})
    if op == "patch":
        return session.patch(f"{base}/{rid}", json={"amount": rng.randint(1, 999)})
    if op == "delete":
        return session.delete(f"{base}/{rid}")
    return session.post(base, json=dcir_record(1000 + n, i))


async def researchers(urls: Sequence[str], writers: int, ops: int, records: int) -> list[int]:
    """Concurrent writers doing creates, PUTs, PATCHes and DELETEs on shared records, spread
    over the proxies at ``urls``."""
    statuses: list[int] = []

    async def writer(n: int) -> None:
        rng = random.Random(n)
        base = f"{urls[n % len(urls)]}/v1/datasets/dcir/records"
        async with aiohttp.ClientSession(headers=AUTH) as session:
            for i in range(ops):
                async with researcher_write(session, base, rng, records, n, i) as resp:
                    body = await resp.read()
                    statuses.append(resp.status)
                    if resp.status >= 500:  # what went wrong, for a failing test's log
                        log.warning("a researcher's write answered %d: %s", resp.status, body[:300])

    await asyncio.gather(*(writer(n) for n in range(writers)))
    return statuses


# --- Checks the shadow tests share ------------------------------------------------------------

GROUPED = {"group_by": "department", "metrics": ["count", "sum:amount"]}


async def planted_divergence_is_found(world: World) -> None:
    """Clean reads match; a changed field, a missing row, an extra row inside a page and a
    changed aggregate planted in the target are found at their pointers."""
    base = f"{world.proxy}/v1/datasets/dcir"
    async with aiohttp.ClientSession(headers=AUTH) as session:
        # Clean first: the same reads match.
        assert await get(session, f"{base}/records/3") == 200
        assert await get(session, f"{base}/records?limit=100") == 200
        assert await query(session, f"{base}/query", GROUPED) == 200
        counts = await world.settled()
        assert counts["matched"] == 3 and counts["mismatched"] == 0, counts

        # A changed field, a missing row, an extra row inside a page, a changed aggregate.
        await world.sql(world.target_db, "UPDATE dcir SET amount = amount + 1 WHERE id = 3")
        await world.sql(world.target_db, "DELETE FROM dcir WHERE id = 7")
        await world.sql(
            world.target_db,
            "INSERT INTO dcir (id, patient_id, act_code, act_date, amount,"
            " prescriber_speciality, department, created_at, updated_at)"
            " SELECT 10001, patient_id, act_code, act_date, amount,"
            " prescriber_speciality, department, created_at, updated_at FROM dcir WHERE id = 9",
        )
        assert await get(session, f"{base}/records/3") == 200
        assert await get(session, f"{base}/records/7") == 200
        assert await get(session, f"{base}/records?limit=100") == 200
        assert await query(session, f"{base}/query", GROUPED) == 200
        counts = await world.settled()
    assert counts["mismatched"] == 4, counts
    assert counts["compared"] == 7, counts
    found = {(m["routes"][0], m["part"], m["pointer"], m["kind"]) for m in await world.mismatches()}
    records, one, q = (
        "/v1/datasets/{dataset}/records",
        "/v1/datasets/{dataset}/records/{id}",
        "/v1/datasets/{dataset}/query",
    )
    assert (one, "body", "/record/amount", "changed") in found  # the changed field
    assert (one, "status", "", "changed") in found  # the missing row, read alone
    assert (records, "body", "/records/2/amount", "changed") in found  # id 3, third in the page
    assert (records, "body", "/records/6", "missing") in found
    # In an unordered array, elements are named by their place among both sides' keys, sorted:
    # id 7 is 7th (index 6), id 10001 the 51st (index 50).
    assert (records, "body", "/records/50", "extra") in found
    # The aggregate: the changed amount and the moved rows change count and sum in groups.
    assert any(r == q and p.endswith("/sum_amount") and k == "changed" for r, _, p, k in found)
    assert any(r == q and p.endswith("/count") and k == "changed" for r, _, p, k in found)
