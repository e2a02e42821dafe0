"""``bascule demo``: the cutover story on one machine, on embedded stores when none are configured.

Two reference-API instances: the "source" cloud over a seeded database, the "target" cloud over
an empty one. A bascule proxy in front of them; one dataset moved to the target with the SRE
commands (dual write, backfill and verification, shadow reads, a divergence found, repaired, the
gate, the controller's promotion, a write in live, a rollback) while researchers keep calling
the same endpoint. The demo runs on the example configuration, with a short gate window and
the backends' databases filled in (its own copy, in its work folder).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import re
import secrets
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from bascule.config import Config, load_config
from bascule.errors import UsageError
from bascule.procs import ServerProcess, bascule_argv
from bascule.state.servers import (
    StoreEndpoints,
    create_database,
    provide_stores,
    redact_url,
)
from bascule.tasks import spawn

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "bascule.example.toml"
VOLATILE = ("served_at",)
DEMO_COMPARED = 20
DEMO_WINDOW = 6.0
"""The gate the demo runs with: comparisons over seconds, where the example asks for an hour."""
DATABASES = ("snds_source", "snds_target", "bascule_demo_state")
"""The databases the demo makes on the state Postgres's server, and replaces on each run."""
MARK = "made by bascule demo: replaced on each run"
"""The comment the demo leaves on its databases: it drops none without it, unless told to."""
_LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+) (?P<logger>\S+) (?P<message>.*)$"
)
"""A log record as ``bascule`` writes it to stderr (``bascule/cli.py``)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("demo", help="run the whole story on this machine")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML configuration")
    parser.add_argument("--rows", type=int, default=10_000, help="rows per dataset (default 10000)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the synthetic data")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds to run, then stop (default: Ctrl-C)"
    )
    for flag, what in PORTS.items():
        parser.add_argument(
            flag, type=int, metavar="PORT", help=f"{what} (default: the configuration's)"
        )
    parser.add_argument(
        "--replace-databases",
        action="store_true",
        help=f"drop {', '.join(DATABASES)} on the state Postgres's server even if this demo did "
        "not make them (by default it refuses)",
    )
    parser.set_defaults(func=run)


PORTS = {
    "--port": "the researcher port of the demo's proxy",
    "--admin-port": "the admin port of the demo's proxy",
    "--source-port": "the source cloud's reference API",
    "--target-port": "the target cloud's reference API",
}
"""The demo's port flags, and what listens on each."""


@dataclass(frozen=True)
class Addresses:
    """Where the demo's servers listen: the configuration's, or the port flags'."""

    listen: str
    admin_listen: str
    source_url: str
    target_url: str

    @classmethod
    def of(cls, config: Config, args: argparse.Namespace) -> Addresses:
        listen = _with_port(config.proxy.listen, args.port, "--port")
        admin = _with_port(config.proxy.admin_listen, args.admin_port, "--admin-port")
        source = _url_with_port(config.source_backend.url, args.source_port, "--source-port")
        target = _url_with_port(config.target_backend.url, args.target_port, "--target-port")
        return cls(listen, admin, source, target)

    def check_free(self) -> None:
        """Every address free to listen on, or UsageError naming the port and its flag, before
        anything starts (a port taken was found only once the proxy failed to start, after
        the demo had said it stopped cleanly)."""
        seen: dict[tuple[str, int], str] = {}
        for (host, port), flag in self._bound():
            if (host, port) in seen:
                raise UsageError(f"port {port} is given twice ({seen[host, port]} and {flag})")
            seen[host, port] = flag
            if not _free(host, port):
                raise UsageError(
                    f"port {port} on {host} ({PORTS[flag]}) is taken: pick a free one with "
                    f"{flag} PORT"
                )

    def _bound(self) -> list[tuple[tuple[str, int], str]]:
        source, target = urlsplit(self.source_url), urlsplit(self.target_url)
        return [
            (_host_port(self.listen), "--port"),
            (_host_port(self.admin_listen), "--admin-port"),
            ((source.hostname or "127.0.0.1", source.port or 80), "--source-port"),
            ((target.hostname or "127.0.0.1", target.port or 80), "--target-port"),
        ]


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _check_port(port: int, flag: str) -> int:
    if not 0 < port < 65536:
        raise UsageError(f"{flag} must be a port number from 1 to 65535, got {port}")
    return port


def _with_port(address: str, port: int | None, flag: str) -> str:
    if port is None:
        return address
    return f"{address.rpartition(':')[0]}:{_check_port(port, flag)}"


def _url_with_port(url: str, port: int | None, flag: str) -> str:
    if port is None:
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:{_check_port(port, flag)}"))


def _free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (as ours do, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return True


def run(args: argparse.Namespace) -> int:
    if args.rows < 1:
        raise UsageError("--rows must be at least 1")
    if args.duration is not None and args.duration < 0:
        raise UsageError("--duration must not be negative")
    config = load_config(args.config)
    addresses = Addresses.of(config, args)
    addresses.check_free()
    demo = Demo(
        config,
        args.config,
        args.rows,
        args.seed,
        args.duration,
        Console(soft_wrap=True),
        addresses=addresses,
        replace_databases=args.replace_databases,
    )
    return asyncio.run(demo.main())


@dataclass(frozen=True)
class Instance:
    role: str
    name: str
    url: str
    database_url: str


class Demo:
    def __init__(
        self,
        config: Config,
        config_path: Path,
        rows: int,
        seed: int,
        duration: float | None,
        console: Console,
        *,
        addresses: Addresses | None = None,
        replace_databases: bool = False,
    ) -> None:
        self.config = config
        self.addresses = addresses or Addresses(
            config.proxy.listen,
            config.proxy.admin_listen,
            config.source_backend.url,
            config.target_backend.url,
        )
        self.replace_databases = replace_databases
        self.rows = rows
        self.seed = seed
        self.duration = duration
        self.console = console
        self.researcher_token = "demo-" + secrets.token_urlsafe(12)
        self.service_token = "svc-" + secrets.token_urlsafe(24)
        self.workdir = Path(tempfile.mkdtemp(prefix="bascule-demo-"))
        self.processes: list[ServerProcess] = []
        self.admin_token = "ops-" + secrets.token_urlsafe(16)
        self.proxy_env: dict[str, str] = {}
        self.config_path = config_path
        self.source_db = ""
        self.target_db = ""
        """The target cloud's database, where the demo plants a divergence."""
        self.state_db = ""

    async def main(self) -> int:
        say = self.console.print
        say("[bold]bascule demo[/bold] — two clouds, one researcher API")
        state = self.config.state
        with provide_stores(state.postgres_url, state.redis_url) as stores:
            say(f"stores: {stores.describe()}")
            try:
                code = await self._story(stores)
            except BaseException:
                if self.processes:
                    await self._stop()
                    say(f"stopped on an error (below); logs in {self.workdir}")
                raise
            await self._stop()
            say(f"stopped cleanly; logs in {self.workdir}")
            return code

    async def _stop(self) -> None:
        for proc in reversed(self.processes):
            await proc.stop()

    async def _databases(self, server: str) -> dict[str, str]:
        """The demo's databases, made afresh on the state Postgres's server: said first, and
        none dropped that the demo did not make (its comment), unless ``--replace-databases``."""
        self.console.print(
            f"databases: the demo makes {', '.join(DATABASES)} on {redact_url(server)}, "
            "replacing the ones it made on an earlier run"
        )
        conn = await asyncpg.connect(server)
        try:
            found = {
                row["datname"]: row["comment"]
                for row in await conn.fetch(
                    "SELECT datname, shobj_description(oid, 'pg_database') AS comment"
                    " FROM pg_database WHERE datname = ANY($1::text[])",
                    list(DATABASES),
                )
            }
        finally:
            await conn.close()
        foreign = sorted(name for name, comment in found.items() if comment != MARK)
        if foreign and not self.replace_databases:
            raise UsageError(
                f"{', '.join(foreign)} already exist on {redact_url(server)} and were not made "
                "by the demo: left alone. Point the demo at another server (BASCULE_POSTGRES_URL "
                "or [state] postgres_url), or pass --replace-databases to drop them"
            )
        if foreign:
            self.console.print(f"  dropping {', '.join(foreign)} (--replace-databases)")
        made = {}
        for name in DATABASES:
            made[name] = await create_database(server, name, replace=True)
        conn = await asyncpg.connect(server)
        try:
            for name in DATABASES:
                await conn.execute(f"COMMENT ON DATABASE \"{name}\" IS '{MARK}'")
        finally:
            await conn.close()
        return made

    async def _story(self, stores: StoreEndpoints) -> int:
        say = self.console.print
        await self._check_redis(stores.redis_url)
        databases = await self._databases(stores.postgres_url)
        self.state_db = databases["bascule_demo_state"]
        instances = [
            Instance(
                "source",
                self.config.migration.source,
                self.addresses.source_url,
                databases["snds_source"],
            ),
            Instance(
                "target",
                self.config.migration.target,
                self.addresses.target_url,
                databases["snds_target"],
            ),
        ]
        self.source_db, self.target_db = instances[0].database_url, instances[1].database_url
        started = time.monotonic()
        await self._seed(instances[0])
        say(
            f"seeded snds_source: {self.rows:,} rows per dataset, seed {self.seed}, in "
            f"{time.monotonic() - started:.1f}s; snds_target is empty: nothing migrated yet"
        )
        for inst in instances:
            await self._serve(inst)
        self.config_path = self._demo_config(self.config_path)
        await self._start_proxy(stores)
        self._show_layout(instances)

        await self._query_side_by_side(instances, "before the migration", expect_same=False)
        ok = await self._cutover_story(instances)
        proxy = "http://" + self.config.proxy.listen
        token = self.researcher_token
        say(
            "\ntry it (through bascule, as researchers do):\n"
            f"  curl -i -H 'Authorization: Bearer {token}' {proxy}/v1/datasets/dcir/records/1\n"
            f"  curl -H 'Authorization: Bearer {token}' "
            f'-d \'{{"group_by": "act_code", "metrics": ["count"]}}\' '
            f"{proxy}/v1/datasets/dcir/query\n"
            "and as an SRE, in another terminal:\n"
            f"  export BASCULE_ADMIN_URL=http://{self.config.proxy.admin_listen} "
            f"BASCULE_ADMIN_TOKEN={self.admin_token}\n"
            "  .venv/bin/bascule status\n"
            "  .venv/bin/bascule gate dcir\n"
            "  .venv/bin/bascule stage pmsi dualwrite --reason 'try it'\n"
            "  .venv/bin/bascule status --watch\n"
            f"and as on-call, in a browser: http://{self.config.proxy.admin_listen}/ "
            f"(log in with {self.admin_token})"
        )
        await self._wait()
        return 0 if ok else 1

    def _demo_config(self, example: Path) -> Path:
        """The example configuration as the demo runs it: the backends' databases (for backfill
        and verification), a gate window of seconds rather than an hour, a controller that looks
        every second, and ``auto_promote`` for dcir. Written in the demo's work folder."""
        text = example.read_text()
        changes = {
            "min_compared = 1000": f"min_compared = {DEMO_COMPARED}",
            "window = 3600.0": f"window = {DEMO_WINDOW}",
            "interval = 5.0": "interval = 1.0",
            "lease = 15.0": "lease = 3.0",
            # Both backends' databases are known here: an authority switch moves dcir's ids.
            '# ids = { table = "dcir"': 'ids = { table = "dcir"',
        }
        for before, after in changes.items():
            if before not in text:
                raise UsageError(f"{example}: the demo expects `{before}` in it (an example key)")
            text = text.replace(before, after, 1)
        source, target = self.config.migration.source, self.config.migration.target
        for table, key, value in (
            ("proxy", "listen", self.addresses.listen),
            ("proxy", "admin_listen", self.addresses.admin_listen),
            (f"backends.{source}", "url", self.addresses.source_url),
            (f"backends.{source}", "database", self.source_db),
            (f"backends.{target}", "url", self.addresses.target_url),
            (f"backends.{target}", "database", self.target_db),
        ):
            text = _set_key(text, table, key, value)
        path = self.workdir / "bascule.demo.toml"
        path.write_text(text)
        self.config = load_config(path)
        self.console.print(
            f"demo settings ({path.name}): the gate wants {DEMO_COMPARED} comparisons over "
            f"{DEMO_WINDOW:g} s (an hour in the example), the controller looks every second"
        )
        return path

    async def _start_proxy(self, stores: StoreEndpoints) -> None:
        self.proxy_env = {
            "BASCULE_POSTGRES_URL": self.state_db,
            "BASCULE_REDIS_URL": stores.redis_url,
            "BASCULE_ADMIN_TOKEN": self.admin_token,
            "BASCULE_VIEWER_TOKEN": self.admin_token,
            # Demo keys, made for this run only: never a real deployment's.
            "BASCULE_JOURNAL_KEY": secrets.token_hex(32),
            "BASCULE_HMAC_KEY": secrets.token_hex(32),
        }
        for backend in (self.config.source_backend, self.config.target_backend):
            if backend.credential_env:  # bascule's own credential for replays
                self.proxy_env[backend.credential_env] = self.service_token
        await self._bascule("migrate")
        proxy = ServerProcess(
            name="bascule proxy",
            argv=bascule_argv("proxy", "--config", str(self.config_path)),
            health_url=f"http://{self.config.proxy.admin_listen}/readyz",
            log_path=self.workdir / "proxy.log",
            env=self.proxy_env,
            stop_signal=signal.SIGINT,  # no load balancer to warn: no pre-stop window
        )
        self.processes.append(proxy)
        await proxy.start()

    async def _bascule(self, *args: str, check: bool = True) -> str:
        """Run a bascule command as an SRE would; its output, or UsageError if it failed
        (``check=False``: its output whatever its exit code)."""
        code, text, errors = await self._bascule_code(*args)
        if check and code != 0:
            raise UsageError(f"`bascule {' '.join(args)}` failed:\n{(text + errors)[-2000:]}")
        return text

    async def _write_story(self, session: aiohttp.ClientSession, base: str) -> bool:
        """A researcher's write in `live`: the target answers, the source gets it replayed."""
        say = self.console.print
        async with session.patch(f"{base}/v1/datasets/dcir/records/1", json={"amount": 123.45}):
            pass
        clouds = {
            self.config.migration.target: self.config.target_backend.url,
            self.config.migration.source: self.config.source_backend.url,
        }
        amounts: dict[str, object] = {}
        for _ in range(50):  # the replay is asynchronous: give it a moment
            for name, url in clouds.items():
                async with session.get(f"{url}/v1/datasets/dcir/records/1") as resp:
                    amounts[name] = (await resp.json())["record"]["amount"]
            if all(a == 123.45 for a in amounts.values()):
                break
            await asyncio.sleep(0.1)
        cells = ", ".join(f"{name} holds {amount}" for name, amount in amounts.items())
        say(f"  a researcher's PATCH through bascule in live (amount 123.45): {cells}")
        return all(a == 123.45 for a in amounts.values())

    async def _sre(self, *args: str, expect: int = 0) -> str:
        """Run a bascule command as the SRE, show it and what it said; a refusal the story
        expects (``expect``) is shown as such."""
        say = self.console.print
        say(f"  $ bascule {' '.join(_quoted(a) for a in args)}")
        code, out, errors = await self._bascule_code(*args)
        if code != expect:
            raise UsageError(f"`bascule {' '.join(args)}` exited {code}:\n{(out + errors)[-2000:]}")

        def shown(line: str) -> None:
            say(line, markup=False, highlight=False)  # what a command said is never markup

        # Its progress (stderr) came before its report (stdout); its verdict comes last.
        verdict = [line for line in errors.splitlines() if line.startswith("bascule: ")]
        for line in [*(e for e in errors.splitlines() if e not in verdict), *out.splitlines()]:
            shown(f"    {line}")
        refused = False
        for line in verdict:
            if line.startswith("bascule: refused: ") and expect:
                refused = True
                head, *why = _short_refusal(line.removeprefix("bascule: refused: "))
                shown(f"    refused, as the story expects: {head}")
                for part in why:
                    shown(f"      · {part}")
            else:
                shown(f"    {line}")
        if expect and not refused:
            say(f"    (exit {code}, as the story expects)")
        return out

    async def _cutover_story(self, instances: list[Instance]) -> bool:
        """Move dcir to the target cloud: dual write, backfill, shadow reads, a divergence found
        and repaired, the gate, the controller's promotion; a write in live; a rollback."""
        say = self.console.print
        say("\n[bold]the cutover, one dataset at a time[/bold]")
        headers = {"Authorization": f"Bearer {self.researcher_token}"}
        base = "http://" + self.config.proxy.listen
        src, tgt = self.config.migration.source, self.config.migration.target
        ok = True
        async with aiohttp.ClientSession(headers=headers) as session:

            async def show(moment: str, expect: dict[str, str]) -> None:
                nonlocal ok
                got = {}
                for name in expect:
                    async with session.get(f"{base}/v1/datasets/{name}/records/1") as resp:
                        got[name] = resp.headers.get("X-Served-By", f"? ({resp.status})")
                ok &= got == expect
                cells = ", ".join(f"{name} by {side}" for name, side in got.items())
                say(f"  {moment}: researchers calling {base} are served {cells}")

            await show("before", {"dcir": src, "pmsi": src})
            say("\n[bold]1. dual write, then copy what the target lacks[/bold]")
            await self._sre(
                "stage", "dcir", "dualwrite", "--reason", "demo: start dual write", "--by", "sre"
            )
            await self._sre("stage", "dcir", "shadow", "--dry-run", expect=3)
            await self._sre("backfill", "dcir", "--by", "sre")
            ok &= await self._query_side_by_side(instances, "after the backfill", only="dcir")

            say("\n[bold]2. shadow: researchers' reads compared with the target's[/bold]")
            await self._sre(
                "stage", "dcir", "shadow", "--reason", "demo: backfilled, verified", "--by", "sre"
            )
            async with self._researchers(session, base):
                ok &= await self._divergence_story(session, base)
                say("\n[bold]3. the gate, and the controller[/bold]")
                # This stage's evidence holds a mismatch: its window starts afresh once the
                # data are repaired, with a new stage version.
                await self._sre(
                    "rollback",
                    "dcir",
                    "--to",
                    "dualwrite",
                    "--reason",
                    "demo: rerun",
                    "--by",
                    "sre",
                )
                await self._sre(
                    "stage", "dcir", "shadow", "--reason", "demo: repaired", "--by", "sre"
                )
                await self._sre("gate", "dcir", expect=3)
                await self._sre(
                    "auto-promote", "dcir", "on", "--reason", "demo: let it go", "--by", "sre"
                )
                ok &= await self._promoted()
            await show("dcir live", {"dcir": tgt, "pmsi": src})
            ok &= await self._write_story(session, base)
            await self._sre(
                "rollback", "dcir", "--to", "shadow", "--reason", "demo: back", "--by", "sre"
            )
            await asyncio.sleep(0.2)
            await show("after rollback", {"dcir": src, "pmsi": src})
        say(await self._bascule("history", "dcir"))
        return ok

    @contextlib.asynccontextmanager
    async def _researchers(self, session: aiohttp.ClientSession, base: str) -> AsyncIterator[None]:
        """Researchers reading dcir's records through bascule, a few a second, meanwhile."""
        stop = asyncio.Event()

        async def read() -> None:
            rid = 0
            while not stop.is_set():
                rid = rid % min(self.rows, 50) + 1
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{base}/v1/datasets/dcir/records/{rid}") as resp:
                        await resp.read()
                await asyncio.sleep(0.05)

        reader = spawn(read(), name="demo-researchers")
        try:
            yield
        finally:
            stop.set()
            await reader

    async def _promoted(self) -> bool:
        """Wait for the controller to move dcir to live once its gate holds; show it."""
        say = self.console.print
        say(
            f"  (the controller promotes dcir once {DEMO_COMPARED} comparisons over "
            f"{DEMO_WINDOW:g} s are clean)"
        )
        for _ in range(int(DEMO_WINDOW * 10) + 200):
            status = orjson.loads(await self._bascule("status", "dcir", "--json"))
            if status["datasets"][0]["stage"] == "live":
                break
            await asyncio.sleep(0.1)
        history = orjson.loads(await self._bascule("history", "dcir", "--json"))["history"]
        last = history[-1]
        promoted = (last["actor"], last["to_stage"]) == ("controller", "live")
        if promoted:
            gate = last["details"].get("gate", {})
            say(
                f"  the controller moved dcir to live: {last['reason']} (volume "
                f"{gate.get('volume')}, mismatches {gate.get('mismatches')}, window "
                f"{gate.get('window')} s)"
            )
        return promoted

    async def _divergence_story(self, session: aiohttp.ClientSession, base: str) -> bool:
        """In `shadow`, researchers' reads are compared with the target's answers: a value
        changed behind bascule's back, straight in the target's database, is found and shown
        to on-call as a pointer and a kind, never as the value; the gate refuses to go on, and
        a verification finds the record (as a token) and repairs it."""
        say = self.console.print
        changed = "UPDATE dcir SET amount = amount + 1 WHERE id = 2"
        say(f"  divergence planted in snds_target behind bascule's back: {changed}")
        conn = await asyncpg.connect(self.target_db)
        try:
            await conn.execute(changed)
        finally:
            await conn.close()
        shown = ""
        for _ in range(100):  # the comparisons are asynchronous: give them a moment
            shown = await self._bascule("divergence", "dcir")
            if "/record/amount" in shown:
                break
            await asyncio.sleep(0.2)
        say("  $ bascule divergence dcir")
        say("    " + shown.replace("\n", "\n    "))
        await self._sre("stage", "dcir", "live", "--reason", "demo: go?", "--by", "sre", expect=3)
        await self._sre("verify", "dcir", expect=4)
        await self._sre(
            "verify", "dcir", "--repair", "--reason", "demo: the source is right", "--by", "sre"
        )
        # The gate trusts the newest verification only: the repaired data is verified afresh.
        await self._sre("verify", "dcir")
        return "/record/amount" in shown

    async def _bascule_code(self, *args: str) -> tuple[int, str, str]:
        """Run a bascule command as an SRE would: its exit code, its output, and what it said
        on stderr but its log records. Those go to ``commands.log`` in the work folder (a raw
        log line broke the story's layout); a warning is shown as a note in the story."""
        proc = await asyncio.create_subprocess_exec(
            *bascule_argv(*args, "--config", str(self.config_path)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **self.proxy_env, "COLUMNS": "100"},
        )
        out, err = await proc.communicate()
        assert proc.returncode is not None
        said = []
        with (self.workdir / "commands.log").open("a") as log:
            log.write(f"$ bascule {' '.join(args)}\n")
            for line in err.decode(errors="replace").splitlines():
                record = _LOG_LINE.match(line)
                if record is None:
                    said.append(line)
                    continue
                log.write(line + "\n")
                if record["level"] in ("WARNING", "ERROR", "CRITICAL"):
                    said.append(f"note ({record['level'].lower()}): {record['message']}")
        return proc.returncode, out.decode(errors="replace").strip(), "\n".join(said)

    async def _check_redis(self, url: str) -> None:
        client = aioredis.Redis.from_url(url)
        try:
            await client.ping()
        finally:
            await client.aclose()

    async def _seed(self, inst: Instance) -> None:
        proc = await asyncio.create_subprocess_exec(
            *bascule_argv(
                "api",
                "seed",
                "--database",
                inst.database_url,
                "--rows",
                str(self.rows),
                "--seed",
                str(self.seed),
            ),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise UsageError(f"seeding {inst.role} failed:\n{out.decode(errors='replace')[-2000:]}")

    async def _serve(self, inst: Instance) -> None:
        parts = urlsplit(inst.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        proc = ServerProcess(
            name=f"reference API {inst.name}",
            argv=bascule_argv(
                "api",
                "--name",
                inst.name,
                "--database",
                inst.database_url,
                "--host",
                host,
                "--port",
                str(port),
            ),
            health_url=f"{inst.url}/healthz",
            log_path=self.workdir / f"api-{inst.name}.log",
            env={"BASCULE_API_TOKENS": f"{self.researcher_token},{self.service_token}"},
        )
        self.processes.append(proc)
        await proc.start()

    def _show_layout(self, instances: list[Instance]) -> None:
        table = Table(title="what runs where")
        for col in ("role", "name", "serves at", "database"):
            table.add_column(col)
        for inst in instances:
            table.add_row(inst.role, inst.name, inst.url, redact_url(inst.database_url))
        self.console.print(table)

    async def _query_side_by_side(
        self,
        instances: list[Instance],
        moment: str,
        *,
        expect_same: bool = True,
        only: str | None = None,
    ) -> bool:
        """The same questions to both clouds, directly; True when they answer as expected
        (``expect_same``: identically; else the target lacks the data)."""
        queries: list[tuple[str, str, str, dict[str, Any] | None]] = [
            ("page dcir", "GET", "/v1/datasets/dcir/records?limit=50", None),
            ("get dcir 1", "GET", "/v1/datasets/dcir/records/1", None),
            ("get pmsi 1", "GET", "/v1/datasets/pmsi/records/1", None),
            (
                "dcir sum by act",
                "POST",
                "/v1/datasets/dcir/query",
                {"group_by": "act_code", "metrics": ["count", "sum:amount"]},
            ),
        ]
        if only is not None:
            queries = [q for q in queries if f"/{only}/" in q[2]]
        table = Table(title=f"the same questions to both clouds, {moment}")
        for col in ("query", "source", "target", "same answer"):
            table.add_column(col)
        all_ok = True
        headers = {"Authorization": f"Bearer {self.researcher_token}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            for label, method, path, body in queries:
                answers = await asyncio.gather(
                    *(self._ask(session, method, inst.url + path, body) for inst in instances)
                )
                same = answers[0][1] == answers[1][1] and answers[0][0] == answers[1][0]
                all_ok &= same == expect_same
                cells = [f"{status} by {served_by}" for status, _, served_by in answers]
                table.add_row(label, *cells, "[green]yes[/green]" if same else "[red]no[/red]")
        self.console.print(table)
        return all_ok

    async def _ask(
        self, session: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any] | None
    ) -> tuple[int, Any, str]:
        data = orjson.dumps(body) if body is not None else None
        async with session.request(method, url, data=data) as resp:
            payload = orjson.loads(await resp.read())
            if isinstance(payload, dict):
                for key in VOLATILE:
                    payload.pop(key, None)
            return resp.status, payload, resp.headers.get("X-Served-By", "?")

    async def _wait(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        what = f"for {self.duration:g}s" if self.duration is not None else "until Ctrl-C"
        self.console.print(f"\nrunning {what}…")
        waiter: Awaitable[bool] = stop.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.duration):
                await waiter
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _quoted(arg: str) -> str:
    return repr(arg) if " " in arg else arg


def _short_refusal(message: str, width: int = 96) -> list[str]:
    """A refusal the story expects, short: its head (``dcir: cannot move a -> b``), then each
    reason on a line of its own, cut at ``width``; the advice on overriding it is left out
    (the story does not override)."""
    clauses = [c for c in message.split("; ") if "override with" not in c] or [message]
    # "dcir: cannot move a -> b: first reason": the head ends at the stage after the arrow.
    before, arrow, after = clauses[0].partition(" -> ")
    stage, colon, first = after.partition(": ")
    if arrow and colon:
        clauses[0:1] = [f"{before}{arrow}{stage}", first]
    return [c if len(c) <= width else c[: width - 2].rsplit(" ", 1)[0] + " …" for c in clauses]


def _set_key(text: str, table: str, key: str, value: str) -> str:
    """``text`` (TOML) with ``key = "value"`` in ``[table]``: replaced where the table has it,
    added under its header otherwise, and the table added at the end if missing."""
    line = f"{key} = {orjson.dumps(value).decode()}"  # a TOML basic string
    header = re.search(rf"^\[{re.escape(table)}\][ \t]*(#.*)?$", text, re.M)
    if header is None:
        return f"{text.rstrip()}\n\n[{table}]\n{line}\n"
    end = re.search(r"^\[", text[header.end() :], re.M)
    body_end = header.end() + (end.start() if end else len(text) - header.end())
    body = text[header.end() : body_end]
    found = re.search(rf"^{re.escape(key)}[ \t]*=.*$", body, re.M)
    if found is not None:
        body = body[: found.start()] + line + body[found.end() :]
    else:
        body = "\n" + line + body
    return text[: header.end()] + body + text[body_end:]
