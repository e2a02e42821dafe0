"""A data job's world: what a verification or a backfill of one dataset holds while it runs.

:func:`data_job` checks everything a job needs before it changes anything (the dataset, both
databases' DSNs, the keys, the state schema, the table on both sides and its primary key), takes
the dataset's data lock, and opens the few sessions a job uses: one pinned, read-only session
per backend database, and three on the state database (the lock's, and two for the journal and
the stage store).
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import asyncpg

from bascule.config import Config, Route, Secrets
from bascule.errors import Refused, UnknownDataset
from bascule.sealing import Namer, Sealer
from bascule.stages import Side
from bascule.state.journal import Journal
from bascule.state.journal.writes import WriterConnection
from bascule.state.postgres import Probes, open_pool, reaching_postgres, schema_check
from bascule.state.stage_store import StageRow, StageStore
from cutover.journaled import JournalView
from cutover.repair import clear_interrupted
from cutover.runs import Runs
from cutover.tables import (
    Conn,
    Pair,
    agree,
    database_of,
    discover,
    hash_seed,
    pair,
    reading,
    session,
)


class Progress(Protocol):
    """Where a job reports how far it is (a terminal's progress bars, plain lines, nothing).
    Tasks: ``chunks`` (finding chunk boundaries), ``source`` and ``target`` (rows scanned),
    ``copy`` (rows copied), ``settle`` (records checked again)."""

    def start(self, task: str, total: int | None, unit: str = "rows") -> None: ...

    def advance(self, task: str, rows: int, nbytes: int = 0) -> None: ...

    def done(self, task: str) -> None: ...

    def note(self, text: str) -> None: ...


class Silent:
    """No progress shown."""

    def start(self, task: str, total: int | None, unit: str = "rows") -> None:
        pass

    def advance(self, task: str, rows: int, nbytes: int = 0) -> None:
        pass

    def done(self, task: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass


@dataclass
class Job:
    config: Config
    dataset: str
    actor: str
    namer: Namer
    runs: Runs
    store: StageStore
    journal: Journal
    view: JournalView
    conns: dict[Side, Conn]
    pairs: list[Pair]
    stage: StageRow
    """The dataset's stage when the job began."""
    progress: Progress
    name: str
    """Who writes, for the journal: ``bascule verify HOST:PID``."""

    async def begin(self) -> None:
        """Called by a job once its own checks passed, before it changes anything else: the
        first change a job makes is to settle the repairs a dead job left open (a refused
        command changes nothing)."""
        await clear_interrupted(self.journal, self.dataset, self.actor)


_KEY_FORMATS = {"int2": "integer", "int4": "integer", "int8": "integer", "uuid": "uuid"}
_KEY_FORMATS |= dict.fromkeys(("text", "varchar"), "text")


def _named_alike(config: Config, found: Pair) -> None:
    """Refuse a table whose records the proxy names otherwise than verification does. The
    proxy names (locks, journals) a record by its key as the route reads it, canonical per the
    route's ``key_format``; verification and repair by the key as the database renders it. If
    they differ (a uuid key routed as text: ``F47AC10B-...`` and ``f47ac10b-...``), a write in
    flight would look like a divergence, and a repair would not take its record's lock."""
    wanted = _KEY_FORMATS.get(found.source.key_column.base)
    dataset = found.dataset
    for i, route in enumerate(config.routes):
        if route.key is None or route.dataset not in (None, dataset):
            continue
        if route.dataset is None and "dataset" not in route.params:
            continue
        if route.dataset is None and _shadowed(config.routes[:i], route, dataset):
            continue  # the dataset's own routes before it take its requests (first match wins)
        if route.key_format != wanted:
            fix = (
                f'set key_format = "{wanted}"'
                if wanted
                else "no key_format names such keys as the database renders them"
            )
            raise Refused(
                f"{found.dataset}: the route {route.path} ({', '.join(route.methods)}) names "
                f"records by key_format = {route.key_format!r}, but the key {found.key!r} is "
                f"{found.key_type}: the proxy and verification would name a record apart; {fix}"
            )


def _shadowed(earlier: Sequence[Route], route: Route, dataset: str) -> bool:
    """Do routes of ``dataset`` declared before ``route`` (a route for every dataset) take all
    of its requests for ``dataset``: the same path, that dataset's, for each of its methods?"""
    path = route.path.replace("{dataset}", dataset)
    covered = {m for r in earlier if r.dataset == dataset and r.path == path for m in r.methods}
    return set(route.methods) <= covered


async def _not_one_table(backends: dict[Side, str], conns: dict[Side, Conn], found: Pair) -> None:
    """Refuse two sides that are one table (a target configured with the source's DSN, or
    another DSN of the same database): compared with itself it would be clean, and a backfill
    would copy it onto itself. One server is told by its start time, one database by its
    name on that server, one table by its oid there."""
    seen = []
    for side in Side:
        async with reading(backends[side], "telling which server it is"):
            cur = await conns[side].execute("SELECT pg_postmaster_start_time(), current_database()")
            row = await cur.fetchone()
        seen.append((row, found.side(side).oid))
    if seen[0] == seen[1]:
        raise Refused(
            f"{found.dataset}: backends.{backends[Side.SOURCE]}.database and "
            f"backends.{backends[Side.TARGET]}.database reach one table (the same database on "
            "the same server): compared with itself it would be clean, and a backfill would "
            "copy it onto itself; each backend's database must be its own"
        )


@asynccontextmanager
async def data_job(
    config: Config,
    secrets: Secrets,
    dataset: str,
    postgres_url: str,
    *,
    actor: str,
    purpose: str,
    progress: Progress | None = None,
) -> AsyncIterator[Job]:
    """Check, lock and open what a job on ``dataset`` needs; release it all at the end."""
    if dataset not in config.datasets:
        raise UnknownDataset(dataset, list(config.datasets))
    for side in Side:
        database_of(config, side)  # a missing DSN is named before anything is opened
    namer = Namer(secrets.require("hmac_key"))
    sealer = Sealer(secrets.require("journal_key"))
    name = f"bascule {purpose} {socket.gethostname()}:{os.getpid()}"[:63]
    async with AsyncExitStack() as stack:
        async with reaching_postgres():
            probes = Probes(config.state.dead_session_after)
            own = await asyncpg.connect(
                postgres_url,
                timeout=5.0,
                server_settings={"application_name": name, **probes.server_settings()},
            )
            probes.apply(own)
        stack.push_async_callback(own.close)
        pool = await open_pool(
            postgres_url,
            max_size=2,
            connection_class=WriterConnection,
            application_name=name,
            dead_session_after=config.state.dead_session_after,
        )
        stack.push_async_callback(pool.close)
        await schema_check(pool)
        store = StageStore(pool)
        stage = await store.get(dataset)
        runs = Runs(own, sealer, dataset)
        await runs.lock()
        stack.push_async_callback(runs.unlock)
        journal = Journal(pool, sealer, name, sessions=pool)
        conns: dict[Side, Conn] = {}
        backends: dict[Side, str] = {}
        for side in Side:
            backends[side], conns[side] = await stack.enter_async_context(
                session(config, side, purpose)
            )
        seed = hash_seed(secrets.require("hmac_key"))
        native = await agree([(backends[s], conns[s]) for s in Side], seed)
        source = await discover(conns[Side.SOURCE], backends[Side.SOURCE], Side.SOURCE, dataset)
        target = await discover(conns[Side.TARGET], backends[Side.TARGET], Side.TARGET, dataset)
        found = pair(dataset, source, target, seed)
        if not native:
            progress = progress or Silent()
            progress.note(
                "the two servers' hash functions disagree on a probe row: rows are hashed "
                "as md5 of their text instead (slower)"
            )
            found = replace(found, native_hash=False)
        await _not_one_table(backends, conns, found)
        _named_alike(config, found)
        yield Job(
            config,
            dataset,
            actor,
            namer,
            runs,
            store,
            journal,
            JournalView(journal, namer, config, dataset),
            conns,
            [found],
            stage,
            progress or Silent(),
            name,
        )
