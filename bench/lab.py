"""The benches' world: two reference APIs, a state database, one `bascule proxy`, and how to
read what each of them costs.

:func:`lab` builds it (databases ``{prefix}_src``, ``{prefix}_tgt``, ``{prefix}_state``, dropped
at the end), walks datasets to the stages asked and yields a :class:`Lab`. :class:`Cpu` reads
the CPU time of the processes (``/proc/PID/stat``: utime + stime, children included) and of the
Postgres backends serving each database; :class:`RoundTrips` is a relay in front of Postgres that
counts the round trips its clients make (a simple ``Query`` or an extended-protocol ``Sync``:
each gets exactly one ``ReadyForQuery``) — counted on the wire, whatever the code sending them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bascule.config import Config
from bascule.errors import ProcessFailed
from bascule.procs import ServerProcess, bascule_argv
from bascule.stages import Stage
from bascule.state.postgres import open_pool
from bascule.state.servers import create_database, drop_database, free_port, provide_stores
from bascule.state.stage_store import StageStore
from bascule.tasks import spawn
from refapi.lab import (
    PROXY_ENV,
    RESEARCHER_TOKEN,
    SERVICE_TOKEN,
    migrate_state,
    walk,
    write_config,
)

ROWS = 2000
TICK = os.sysconf("SC_CLK_TCK")
API_ENV = {"BASCULE_API_TOKENS": f"{RESEARCHER_TOKEN},{SERVICE_TOKEN}"}
STAGES: Mapping[Stage, tuple[Stage, ...]] = {
    Stage.SOURCE: (),
    Stage.DUALWRITE: (Stage.DUALWRITE,),
    Stage.SHADOW: (Stage.DUALWRITE, Stage.SHADOW),
    Stage.LIVE: (Stage.DUALWRITE, Stage.SHADOW, Stage.LIVE),
}


@dataclass
class Lab:
    workdir: Path
    admin_url: str
    """The Postgres server's (to read ``pg_stat_activity``)."""
    databases: dict[str, str]
    """``src``, ``tgt``, ``state`` -> URL."""
    ports: dict[str, int]
    config_path: Path
    config: Config
    source: ServerProcess
    target: ServerProcess
    proxy: ServerProcess
    journal: asyncpg.Connection
    """A session on the state database (the bench's own)."""
    code: dict[str, str] = field(default_factory=dict)
    """The environment that runs the servers from the checkout asked."""
    api_pool: int = 10
    """Database connections of each reference API (``bascule api --pool-size``)."""

    @property
    def proxy_url(self) -> str:
        return f"http://{self.config.proxy.listen}"

    @property
    def source_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['src']}"

    @property
    def target_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['tgt']}"

    def api(self, name: str, side: str) -> ServerProcess:
        port = self.ports[side]
        return ServerProcess(
            name,
            bascule_argv(
                "api",
                "--name",
                name,
                "--database",
                self.databases[side],
                "--port",
                str(port),
                "--pool-size",
                str(self.api_pool),
            ),
            f"http://127.0.0.1:{port}/healthz",
            self.workdir / f"{name}.log",
            {**API_ENV, **self.code},
        )

    async def restart_proxy(self, postgres_url: str | None = None) -> None:
        """Stop the proxy and start it again, on ``postgres_url`` for its state if given (a
        :class:`RoundTrips` relay's, say)."""
        await self.proxy.stop()
        text = self.config_path.read_text()
        current = f'postgres_url = "{self.databases["state"]}"'
        wanted = f'postgres_url = "{postgres_url or self.databases["state"]}"'
        lines = [
            wanted if line.startswith("postgres_url = ") else line for line in text.splitlines()
        ]
        assert current in text or "postgres_url = " in text
        self.config_path.write_text("\n".join(lines) + "\n")
        await self.proxy.start()

    async def open_entries(self) -> int:
        count: int = await self.journal.fetchval(
            "SELECT count(*) FROM bascule_journal WHERE state IN ('intent', 'pending')"
        )
        return count

    async def settled(self, poll: float = 0.05, within: float = 120.0) -> None:
        """Until no journal entry is open (``within`` seconds at most)."""
        deadline = time.monotonic() + within
        while await self.open_entries():
            if time.monotonic() > deadline:
                states = await self.journal.fetch(
                    "SELECT state, last_error, count(*) FROM bascule_journal"
                    " WHERE state NOT IN ('applied', 'skipped', 'rejected') GROUP BY 1, 2"
                )
                raise RuntimeError(f"the journal did not settle: {[tuple(r) for r in states]}")
            await asyncio.sleep(poll)

    async def release_backoff(self) -> None:
        """Pending entries due now (an outage's retry delays released)."""
        await self.journal.execute(
            "UPDATE bascule_journal SET next_attempt_at = now() WHERE state = 'pending'"
        )


@contextlib.asynccontextmanager
async def lab(
    prefix: str,
    stages: Mapping[str, Stage],
    *,
    rows: int = ROWS,
    repo: Path | None = None,
    apis: Lab | None = None,
    api_pool: int = 10,
    config_edit: Any = None,
    **config: Any,
) -> AsyncIterator[Lab]:
    """The world, with ``stages`` (dataset -> stage) walked; ``config``: more arguments of
    :func:`refapi.lab.write_config`; ``config_edit``: a function of the config text, for what
    it has no argument for. ``repo``: the checkout the servers run from (this one's by
    default), to compare two versions in one run. ``apis``: another lab whose reference APIs
    (and their databases) this one's proxy fronts, so that two proxies compared in one run
    take half the Postgres connections of two worlds."""
    code = {"PYTHONPATH": str(repo.resolve())} if repo is not None else {}
    # -P: the checkout's code, not the current directory's (which `-m` and `-c` put first).
    python = [sys.executable, "-P"] if repo is not None else [sys.executable]
    workdir = Path(tempfile.mkdtemp(prefix=f"bascule-{prefix}-"))
    sides = ("state",) if apis is not None else ("src", "tgt", "state")
    names = {side: f"{prefix}_{side}" for side in sides}
    with provide_stores() as stores:
        databases = {
            side: await create_database(stores.postgres_url, name, replace=True)
            for side, name in names.items()
        }
        try:
            if apis is not None:
                databases.update(src=apis.databases["src"], tgt=apis.databases["tgt"])
            for side in ("src", "tgt") if apis is None else ():
                proc = await asyncio.create_subprocess_exec(
                    *bascule_argv(
                        "api", "seed", "--database", databases[side], "--rows", str(rows)
                    ),
                    stdout=asyncio.subprocess.DEVNULL,
                )
                await proc.wait()
            if repo is None:
                await migrate_state(databases["state"])
            else:  # with that checkout's migrations: its proxy refuses a newer schema
                proc = await asyncio.create_subprocess_exec(
                    *python,
                    "-c",
                    "import asyncio, sys; from refapi.lab import migrate_state;"
                    " asyncio.run(migrate_state(sys.argv[1]))",
                    databases["state"],
                    env={**os.environ, **code},
                )
                if await proc.wait():
                    raise RuntimeError(f"could not migrate {databases['state']} from {repo}")
            if apis is not None:
                # Its replays carry `bascule:{dataset}:{seq}` to the same APIs as the other
                # lab's: its own seqs, or the APIs would take them for repeats (422).
                conn = await asyncpg.connect(databases["state"])
                try:
                    await conn.execute("ALTER SEQUENCE bascule_journal_seq_seq RESTART 1000000000")
                finally:
                    await conn.close()
            ports = apis.ports if apis is not None else {"src": free_port(), "tgt": free_port()}
            config_path = workdir / "bascule.toml"
            config.setdefault("read_timeout", 10.0)
            cfg = write_config(
                config_path,
                source_url=f"http://127.0.0.1:{ports['src']}",
                target_url=f"http://127.0.0.1:{ports['tgt']}",
                postgres_url=databases["state"],
                redis_url=stores.redis_url,
                redis_prefix=f"{prefix}:",
                **config,
            )
            if config_edit is not None:
                config_path.write_text(config_edit(config_path.read_text()))
            async with AsyncExitStack() as stack:
                proxy = ServerProcess(
                    "bascule proxy",
                    [*python, *bascule_argv("proxy", "--config", str(config_path))[1:]],
                    f"http://{cfg.proxy.admin_listen}/readyz",
                    workdir / "proxy.log",
                    {**PROXY_ENV, **code},
                )
                # The bench's own session polls the open entries (settled()) while the replays
                # of a run drain: by index scan, as bascule's own reads (migration 0011), so
                # that it does not read every dead version of the run again on each poll.
                journal = await asyncpg.connect(
                    databases["state"],
                    server_settings={"enable_bitmapscan": "off", "enable_seqscan": "off"},
                )
                stack.push_async_callback(journal.close)
                world = Lab(
                    workdir,
                    stores.postgres_url,
                    databases,
                    ports,
                    config_path,
                    cfg,
                    ServerProcess("", [], "", workdir / "none.log"),
                    ServerProcess("", [], "", workdir / "none.log"),
                    proxy,
                    journal,
                    code,
                    api_pool,
                )
                if apis is not None:
                    world.source, world.target = apis.source, apis.target
                else:
                    world.source = world.api("azure", "src")
                    world.target = world.api("scaleway", "tgt")
                    for server in (world.source, world.target):
                        stack.push_async_callback(server.stop)
                        await server.start()
                stack.push_async_callback(proxy.stop)
                await proxy.start()
                pool = await open_pool(databases["state"], max_size=1)
                try:
                    store = StageStore(pool)
                    for dataset, stage in stages.items():
                        await walk(store, dataset, *STAGES[stage], actor="bench", reason="b")
                finally:
                    await pool.close()
                await asyncio.sleep(1.5)  # the proxy polls the new stages
                yield world
        finally:
            for name in names.values():
                with contextlib.suppress(Exception):
                    await drop_database(stores.postgres_url, name)


async def start(server: ServerProcess, tries: int = 10) -> None:
    """Start ``server``, again after a pause if it fails (on a Postgres shared with other
    work, a restarted API may find every connection taken for a moment)."""
    for attempt in range(tries):
        try:
            await server.start()
            return
        except ProcessFailed:
            if attempt == tries - 1:
                raise
            await asyncio.sleep(2.0)


def _ticks(pid: int) -> int:
    """utime + stime of ``pid`` (clock ticks); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of the whole line


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _threads(pid: int) -> list[int]:
    """Every thread of ``pid`` (affinity is a thread's)."""
    with contextlib.suppress(OSError):
        return [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    return []


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


def processes(pid: int) -> list[int]:
    """``pid`` and its descendants; for a negative pid, -pid alone."""
    return process_tree(pid) if pid > 0 else [-pid]


async def backends(admin: asyncpg.Connection, databases: Iterable[str]) -> dict[str, list[int]]:
    """The Postgres backends serving each of ``databases`` (``admin``'s own excluded)."""
    rows = await admin.fetch(
        "SELECT datname, pid FROM pg_stat_activity WHERE datname = ANY($1::text[])"
        " AND pid <> pg_backend_pid()",
        list(databases),
    )
    found: dict[str, list[int]] = {}
    for row in rows:
        found.setdefault(row["datname"], []).append(row["pid"])
    return found


@dataclass
class Cpu:
    """CPU seconds used by named processes and by the Postgres backends of named databases,
    between :meth:`start` and :meth:`stop` (a backend that ended in between is lost: the
    benches' pools keep theirs)."""

    admin: asyncpg.Connection
    processes: Mapping[str, int]
    """name -> pid (its descendants included, but for a negative pid: -pid alone)."""
    databases: Mapping[str, str]
    """name -> database name (its backends, the bench's own session excluded)."""
    _before: dict[str, dict[int, int]] = field(default_factory=dict)

    async def _pids(self) -> dict[str, list[int]]:
        pids = {name: processes(pid) for name, pid in self.processes.items()}
        found = await backends(self.admin, self.databases.values())
        for name, datname in self.databases.items():
            pids[name] = found.get(datname, [])
        return pids

    async def start(self) -> None:
        self._before = {
            name: {pid: _ticks(pid) for pid in pids} for name, pids in (await self._pids()).items()
        }

    async def stop(self) -> dict[str, float]:
        """Seconds of CPU per name since :meth:`start`."""
        used: dict[str, float] = {}
        for name, pids in (await self._pids()).items():
            before = self._before.get(name, {})
            ticks = sum(_ticks(pid) - before.get(pid, 0) for pid in pids)
            used[name] = max(0, ticks) / TICK
        return used


class Cores:
    """Pins groups of processes to CPUs for a run: each group's processes (their descendants
    included) and the Postgres backends of its databases, found again every ``every`` seconds
    (a pool may open a session meanwhile); every CPU given back to all of them at the end.
    Postgres' own background processes are left alone: the server is shared, and pinning its
    postmaster would pin every session it starts, long after the bench. Needs the right to
    set another user's affinity (root, or CAP_SYS_NICE): :meth:`possible` says."""

    def __init__(
        self,
        admin_url: str,
        groups: Sequence[tuple[set[int], Sequence[int], Sequence[str]]],
        every: float = 0.1,
    ) -> None:
        self.admin_url = admin_url
        """The Postgres server's (to read ``pg_stat_activity`` on a session of its own)."""
        self.groups = groups
        """(CPUs, pids, database names) each; a pid with its descendants, but for a negative
        one: -pid alone."""
        self.every = every
        self._pinned: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._admin: asyncpg.Connection | None = None

    @staticmethod
    def possible() -> str | None:
        """None if this machine and user can pin as asked; else why not."""
        if len(os.sched_getaffinity(0)) < 2:
            return "fewer than 2 CPUs"
        if os.geteuid() != 0:
            return "pinning Postgres' backends needs root (or CAP_SYS_NICE)"
        return None

    async def _pin(self) -> None:
        names = [name for _, _, databases in self.groups for name in databases]
        assert self._admin is not None
        sessions = await backends(self._admin, names)
        for cpus, pids, databases in self.groups:
            found = [p for pid in pids for p in processes(pid)]
            found += [p for name in databases for p in sessions.get(name, [])]
            for pid in found:
                for task in _threads(pid):
                    with contextlib.suppress(OSError):  # gone meanwhile
                        os.sched_setaffinity(task, cpus)
                        self._pinned.add(task)

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await self._pin()

    async def __aenter__(self) -> Cores:
        self._admin = await asyncpg.connect(self.admin_url)
        await self._pin()
        self._task = spawn(self._keep(), name="bench-cores")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        every = set(range(os.cpu_count() or 1))
        for pid in self._pinned:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, every)
        self._pinned.clear()
        assert self._admin is not None
        await self._admin.close()


class RoundTrips:
    """A relay in front of Postgres that counts its clients' round trips: each simple
    ``Query`` ('Q') or extended-protocol ``Sync`` ('S') message, which Postgres answers with one
    ``ReadyForQuery``. Point a client's URL at :attr:`port`; :attr:`count` is the total so far."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5432) -> None:
        self.upstream = (host, port)
        self.count = 0
        self.port = free_port()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, database_url: str) -> str:
        """``database_url`` through this relay."""
        host = f"{self.upstream[0]}:{self.upstream[1]}"
        assert host in database_url, database_url
        return database_url.replace(host, f"127.0.0.1:{self.port}")

    async def __aenter__(self) -> RoundTrips:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        down = spawn(_pipe(up_reader, writer), name="relay")
        try:
            await self._count(reader, up_writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            down.cancel()
            up_writer.close()
            writer.close()
            self._tasks.discard(task)

    async def _count(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Untyped messages until the startup message: SSL/GSS requests (refused by a server
        # without them: one byte back, which the other direction relays), a cancel request.
        while True:
            head = await reader.readexactly(8)
            length, code = struct.unpack("!ii", head)
            writer.write(head + await reader.readexactly(length - 8))
            if code in (80877103, 80877104):
                continue
            if code == 80877102:
                await writer.drain()
                return
            break
        while True:
            head = await reader.readexactly(5)
            kind, length = head[:1], struct.unpack("!i", head[1:])[0]
            if kind in (b"Q", b"S"):
                self.count += 1
            writer.write(head + await reader.readexactly(length - 4))
            await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns right-aligned but the first."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [str(row[0]).ljust(widths[0])] + [
            str(c).rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)
