"""``bascule proxy``: the data plane — the researcher port and the admin port of one replica."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from aiohttp import web

from bascule import telemetry
from bascule.app.admin import AdminDeps, create_admin_app
from bascule.app.operations import Operations, naming_of
from bascule.config import Backend, Config, ProxySettings, Secrets, load_config
from bascule.errors import UsageError
from bascule.sealing import Namer, Sealer
from bascule.stages import Side
from bascule.state.fleet import REDIS_TIMEOUT, RedisAnnouncer, StageView
from bascule.state.journal import Journal
from bascule.state.journal.writes import WriterConnection
from bascule.state.postgres import CHECK_CLIENT, IDLE_IN_TRANSACTION, open_pool, schema_check
from bascule.state.servers import provide_stores
from bascule.state.stage_store import StageStore
from bascule.tasks import spawn
from bascule.upstream import Upstream
from cutover.autopilot import autopilot_for
from cutover.controller import groups_of
from cutover.gate import gates_of
from cutover.switch import switcher_for
from proxy.dualwrite import DualWriter
from proxy.forward import Forwarder
from proxy.replayer import Replayer
from proxy.resolver import Resolver
from proxy.routing import Router
from proxy.server import Server
from shadow.dispatch import Dispatcher
from shadow.ledger import Ledger
from shadow.link import ShadowLink
from shadow.noise_store import NoiseStore, noise_pairs
from shadow.reads import open_dispatcher

log = logging.getLogger("bascule.proxy")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("proxy", help="run the data plane (researcher and admin ports)")
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("BASCULE_CONFIG"),
        help="TOML configuration (default: $BASCULE_CONFIG)",
    )
    parser.add_argument("--listen", help="researcher host:port (overrides [proxy] listen)")
    parser.add_argument("--admin-listen", help="admin host:port (overrides [proxy] admin_listen)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.config is None:  # as every other command: --config, or BASCULE_CONFIG
        raise UsageError("no configuration: pass --config FILE or set BASCULE_CONFIG")
    config = load_config(args.config)
    secrets = Secrets.from_env(os.environ)
    listen = args.listen or config.proxy.listen
    admin_listen = args.admin_listen or config.proxy.admin_listen
    telemetry.install()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(serve(config, secrets, listen, admin_listen))
    return 0


def _credential(backend: Backend) -> str | None:
    """bascule's service credential for a backend, from the variable the config names."""
    if backend.credential_env is None:
        return None
    value = os.environ.get(backend.credential_env)
    if not value:
        log.warning(
            "%s is not set: replays to that backend carry no credential", backend.credential_env
        )
    return value or None


def create_proxy_server(forwarder: Forwarder, settings: ProxySettings) -> Server:
    return Server(
        forwarder.handle,
        max_body_bytes=settings.max_body_bytes,
        dataset_of=forwarder.dataset_of,
        request_deadline=settings.receive_timeout,
        keepalive_idle=settings.idle_timeout,
    )


@dataclass
class Replica:
    """Everything one proxy replica holds open, in start order."""

    config: Config
    secrets: Secrets
    postgres_url: str
    redis_url: str
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    """This replica, as recorded in the journal and leases."""

    async def __aenter__(self) -> Replica:
        probe = self.config.state.dead_session_after
        self.pool = await open_pool(
            self.postgres_url, dead_session_after=probe, idle_in_transaction=IDLE_IN_TRANSACTION
        )
        await schema_check(self.pool)
        # Announcements, counters, noise: a silent Redis fails them in REDIS_TIMEOUT, never
        # hangs them (the tally's flushes would stop, the gate's evidence with them).
        self.redis = aioredis.Redis.from_url(
            self.redis_url, socket_connect_timeout=1.0, socket_timeout=REDIS_TIMEOUT
        )
        self.store = StageStore(self.pool)
        self.view = StageView(
            self.store,
            self.redis_url,
            self.config.state.redis_prefix,
            self.config.state.poll_interval,
            self.config.datasets,
            self.config.state.stale_after,
            replica=self.name,
        )
        self.upstreams = {
            Side.SOURCE: Upstream(self.config.migration.source, self.config.source_backend),
            Side.TARGET: Upstream(self.config.migration.target, self.config.target_backend),
        }
        for upstream in self.upstreams.values():
            await upstream.open()
        await self.view.start()
        self.dual: DualWriter | None = None
        self.replayer_task: asyncio.Task[None] | None = None
        if self.secrets.journal_key and self.secrets.hmac_key:
            # Writes hold their sessions (and record locks) for their whole life: a pool of
            # their own, so the replayer and resolver are never starved by writers.
            self.journal_pool = await open_pool(
                self.postgres_url,
                max_size=self.config.state.journal_sessions,
                connection_class=WriterConnection,
                # Names the replica holding a dataset's fence, when a change has to wait.
                application_name=f"bascule writer {self.name}"[:63],
                dead_session_after=probe,
                # A write whose session was cut while it waited for its record's lock is
                # refused; its backend must end, not take the lock later and commit the
                # intent of a write nobody will send (tests/proxy/test_write_path.py).
                check_client=CHECK_CLIENT,
            )
            journal = Journal(
                self.pool, Sealer(self.secrets.journal_key), self.name, sessions=self.journal_pool
            )
            namer = Namer(self.secrets.hmac_key)
            router = Router(self.config.routes, self.config.datasets)
            self.dual = DualWriter(
                journal,
                namer,
                self.upstreams,
                view=self.view,
                router=router,
                credentials_header=self.config.proxy.credentials_header,
                require_credentials=self.config.proxy.require_credentials,
                anonymous_writes=self.config.proxy.anonymous_writes,
            )
            routes = {(r.path, m): r for r in self.config.routes for m in r.methods}
            credentials = {
                Side.SOURCE: _credential(self.config.source_backend),
                Side.TARGET: _credential(self.config.target_backend),
            }
            replayer = Replayer(
                journal,
                self.view,
                self.upstreams,
                routes,
                credentials,
                self.name,
                resolver=Resolver(
                    journal,
                    self.upstreams,
                    routes,
                    credentials,
                    orphan_grace=self.config.state.orphan_grace,
                    router=router,
                    namer=namer,
                ),
                retention=self.config.state.journal_retention,
            )
            self.replayer_task = spawn(replayer.run(), name="replayer")
        else:
            log.warning(
                "BASCULE_JOURNAL_KEY or BASCULE_HMAC_KEY is not set: writes to datasets in "
                "dual-write stages will be refused"
            )
        # Every replica runs the controller's loop; the one holding its lease acts.
        self.autopilot = autopilot_for(
            self.config,
            self.store,
            RedisAnnouncer(self.redis, self.config.state.redis_prefix),
            switcher_for(self.config, self.pool),
            gates_of(self.config, self.pool),
            self.name,
        )
        self.autopilot_task = spawn(self.autopilot.run(), name="controller")
        self.shadow_stack = AsyncExitStack()
        self.shadow = await self._shadow_reads()
        return self

    async def _shadow_reads(self) -> Dispatcher | ShadowLink | None:
        """Shadow reads: in a worker process of their own (``[shadow] worker = "process"``)
        or in this event loop (``inline``)."""
        if not self.secrets.hmac_key:
            log.warning(
                "BASCULE_HMAC_KEY is not set: no shadow read (a diff's pointers name members "
                "by keyed tokens)"
            )
            return None
        if self.config.shadow.worker == "inline":
            return await open_dispatcher(
                self.shadow_stack,
                self.config,
                self.secrets,
                pool=self.pool,
                redis=self.redis,
                postgres_url=self.postgres_url,
                replica=self.name,
            )
        link = ShadowLink(
            self.config,
            self.secrets,
            self.postgres_url,
            self.redis_url,
            self.name,
            Ledger(self.pool, self.redis, self.config.state.redis_prefix),
            self.pool,
        )
        await link.start()
        self.shadow_stack.push_async_callback(link.stop)
        return link

    async def __aexit__(self, *exc: object) -> None:
        self.autopilot_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.autopilot_task
        await self.shadow_stack.aclose()
        if self.replayer_task is not None:
            self.replayer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.replayer_task
        if self.dual is not None:
            await self.journal_pool.close()
        await self.view.stop()
        for upstream in self.upstreams.values():
            await upstream.close()
        await self.redis.aclose()
        await self.pool.close()

    def forwarder(self) -> Forwarder:
        router = Router(self.config.routes, self.config.datasets)
        return Forwarder(
            router,
            self.view,
            self.upstreams,
            self.dual,
            shadow=self.shadow,
            namer=Namer(self.secrets.hmac_key) if self.secrets.hmac_key else None,
        )

    def server(self) -> Server:
        return create_proxy_server(self.forwarder(), self.config.proxy)

    def admin_deps(self) -> AdminDeps:
        return AdminDeps(
            Operations(
                self.store,
                RedisAnnouncer(self.redis, self.config.state.redis_prefix),
                switcher_for(self.config, self.pool),
                NoiseStore(self.pool, self.redis, self.config.state.redis_prefix),
                noise_pairs(self.config),
                gates_of(self.config, self.pool),
                groups_of(self.config),
                naming_of(self.config, self.secrets),
            ),
            view=self.view,
            operator_tokens=self.secrets.operators(),
            viewer_token=self.secrets.viewer_token,
        )


async def serve(config: Config, secrets: Secrets, listen: str, admin_listen: str) -> None:
    if not secrets.operators():
        log.warning(
            "no operator token (BASCULE_ADMIN_TOKEN or BASCULE_OPERATOR_TOKENS) is set: "
            "the admin API will refuse every change"
        )
    with provide_stores(config.state.postgres_url, config.state.redis_url, embed=False) as found:
        log.info("state stores: %s", found.describe())
        async with Replica(config, secrets, found.postgres_url, found.redis_url) as replica:
            researcher = replica.server()
            host, _, port = listen.rpartition(":")
            try:
                await researcher.start(host, int(port))
            except OSError as exc:
                raise UsageError(
                    f"cannot listen on {listen} for researchers: {exc.strerror}"
                ) from exc
            log.info("researcher port listening on %s", listen)
            admin = await _start(create_admin_app(replica.admin_deps()), admin_listen, "admin")
            try:
                await _until_stopped()
            finally:
                await researcher.close()
                await admin.cleanup()


async def _start(app: web.Application, address: str, what: str) -> web.AppRunner:
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, int(port), backlog=1024).start()
    except OSError as exc:
        await runner.cleanup()
        raise UsageError(f"cannot listen on {address} for the {what} port: {exc.strerror}") from exc
    log.info("%s port listening on %s", what, address)
    return runner


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
