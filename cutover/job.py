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
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import asyncpg

from bascule.config import Config, Secrets
from bascule.errors import UnknownDataset
from bascule.sealing import Namer, Sealer
from bascule.stages import Side
from bascule.state.journal import Journal
from bascule.state.journal.writes import WriterConnection
from bascule.state.postgres import open_pool, reaching_postgres, schema_check
from bascule.state.stage_store import StageRow, StageStore
from cutover.journaled import JournalView
from cutover.repair import clear_interrupted
from cutover.runs import Runs
from cutover.tables import Conn, Pair, agree, database_of, discover, hash_seed, pair, session


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
            own = await asyncpg.connect(
                postgres_url, timeout=5.0, server_settings={"application_name": name}
            )
        stack.push_async_callback(own.close)
        pool = await open_pool(
            postgres_url, max_size=2, connection_class=WriterConnection, application_name=name
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
        # Everything checked: the first change a job may make is to settle what a dead one left.
        await clear_interrupted(journal, dataset, actor)
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
