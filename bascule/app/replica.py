"""``bascule proxy``: the data plane — the researcher port and the admin port of one replica."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from aiohttp import web

from bascule import logs, metrics, telemetry
from bascule.app.admin import AdminDeps, create_admin_app
from bascule.app.operations import Operations, naming_of
from bascule.config import (
    MAX_WORKERS,
    Backend,
    Config,
    ProxySettings,
    Secrets,
    changed_keys,
    load_config,
    reload_refusal,
)
from bascule.errors import ConfigError, UsageError
from bascule.sealing import Namer, Sealer
from bascule.stages import Side
from bascule.state.fleet import REDIS_TIMEOUT, RedisAnnouncer, StageView
from bascule.state.journal import Journal
from bascule.state.journal.writes import WriterConnection
from bascule.state.postgres import (
    CHECK_CLIENT,
    IDLE_IN_TRANSACTION,
    open_pool,
    schema_check,
    session_name,
    vacuum_check,
)
from bascule.state.servers import provide_stores
from bascule.state.stage_store import StageStore
from bascule.tasks import spawn
from bascule.tls import server_context
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
    parser.add_argument(
        "--workers",
        type=int,
        help=f"serving processes on these ports, 1 to {MAX_WORKERS} (overrides [proxy] workers)",
    )
    # Set by the supervisor on the processes it starts: serve, sharing the ports.
    parser.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.config is None:  # as every other command: --config, or BASCULE_CONFIG
        raise UsageError("no configuration: pass --config FILE or set BASCULE_CONFIG")
    config = load_config(args.config)
    listen = args.listen or config.proxy.listen
    admin_listen = args.admin_listen or config.proxy.admin_listen
    workers = config.proxy.workers if args.workers is None else args.workers
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers: expected 1 to {MAX_WORKERS}, got {workers}")
    if workers > 1 and args.worker_of is None:
        from bascule.app.workers import supervise

        return supervise(args.config, listen, admin_listen, workers)
    secrets = Secrets.from_env(os.environ)
    if config.telemetry.enabled:
        telemetry.install(config.telemetry)
    logs.setup(config.telemetry.logs)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    shared = args.worker_of is not None
    asyncio.run(
        serve(config, secrets, listen, admin_listen, config_path=args.config, shared_ports=shared)
    )
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
    """This replica, as recorded in the journal and leases (each worker process is one)."""
    stopping: bool = False
    """Set on SIGTERM: ``/readyz`` answers 503 from then on, so load balancers move away."""

    async def __aenter__(self) -> Replica:
        if self.config.telemetry.enabled:
            telemetry.install()  # as configured, if `bascule proxy` installed it first
            metrics.configure(self.config.datasets)
        probe = self.config.state.dead_session_after
        self.forwarders: list[Forwarder] = []
        self.servers: list[Server] = []
        self.routes = {(r.path, m): r for r in self.config.routes for m in r.methods}
        """Write routes by (path, method), shared by the replayer and the resolver (a reload
        updates it in place)."""
        # The connection budget (docs/operations.md): `sessions` here, `journal_sessions`
        # for writes, `shadow_sessions` for shadow reads; each named after this replica, so
        # that `bascule status` counts them in pg_stat_activity.
        self.pool = await open_pool(
            self.postgres_url,
            max_size=self.config.state.sessions,
            application_name=session_name("state", self.name),
            dead_session_after=probe,
            idle_in_transaction=IDLE_IN_TRANSACTION,
        )
        await schema_check(self.pool)
        await vacuum_check(self.pool)
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
            Side.SOURCE: Upstream(
                self.config.migration.source, self.config.source_backend, Side.SOURCE.value
            ),
            Side.TARGET: Upstream(
                self.config.migration.target, self.config.target_backend, Side.TARGET.value
            ),
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
                application_name=session_name("writer", self.name),
                dead_session_after=probe,
                # A write whose session was cut while it waited for its record's lock is
                # refused; its backend must end, not take the lock later and commit the
                # intent of a write nobody will send (tests/proxy/test_write_path.py).
                check_client=CHECK_CLIENT,
            )
            journal = Journal(
                self.pool,
                Sealer(self.secrets.journal_key),
                self.name,
                sessions=self.journal_pool,
                session_wait=self.config.state.session_wait,
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
            routes = self.routes
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
        self.figures_task: asyncio.Task[None] | None = None
        telemetry_settings = self.config.telemetry
        if telemetry_settings.enabled and telemetry_settings.exporter.startswith("otlp"):
            # The gauges' figures (stages, journal, gates) are read from the state database:
            # on a scrape of /metrics, and for an OTLP push every metrics_interval, which no
            # scrape may ever refresh.
            self.figures_task = spawn(
                self._refresh_figures(telemetry_settings.metrics_interval), name="figures"
            )
        self.shadow_stack = AsyncExitStack()
        self.shadow = await self._shadow_reads()
        return self

    async def _refresh_figures(self, every: float) -> None:
        ops = self.admin_deps().ops
        while True:
            try:
                await ops.refresh_figures()
            except Exception as exc:  # the state database away, say: the next round tries again
                log.warning("metrics: state figures not refreshed (%s)", type(exc).__name__)
            await asyncio.sleep(every)

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
        for task in (self.autopilot_task, self.figures_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
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
        forwarder = Forwarder(
            router,
            self.view,
            self.upstreams,
            self.dual,
            scheme="https" if self.config.proxy.tls is not None else "http",
            shadow=self.shadow,
            namer=Namer(self.secrets.hmac_key) if self.secrets.hmac_key else None,
        )
        self.forwarders.append(forwarder)
        return forwarder

    def server(self) -> Server:
        server = create_proxy_server(self.forwarder(), self.config.proxy)
        self.servers.append(server)
        return server

    async def reload(self, new: Config) -> None:
        """Run on ``new`` from now on, without dropping a connection: comparison rules,
        sampling and timeouts (:data:`bascule.config.RELOADABLE`; the caller checked that
        nothing else changed, :func:`bascule.config.reload_refusal`). Requests in flight
        finish on the settings they started with; the next ones get the new."""
        self.config = new
        self.upstreams[Side.SOURCE].retime(new.source_backend)
        self.upstreams[Side.TARGET].retime(new.target_backend)
        # Routes: only their comparison rules and timeouts may have changed.
        self.routes.clear()
        self.routes.update({(r.path, m): r for r in new.routes for m in r.methods})
        for forwarder in self.forwarders:
            forwarder.router = Router(new.routes, new.datasets)
        for server in self.servers:
            server.request_deadline = new.proxy.receive_timeout
            server.keepalive_idle = new.proxy.idle_timeout
        if self.shadow is not None:
            # Sampling here; rules, deadlines and timeouts in the worker process too.
            await self.shadow.reconfigure(new)

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
            stopping=lambda: self.stopping,
        )

    async def drain_shadow(self, within: float) -> None:
        """On a graceful stop: shadow reads already handed over finish and are counted, for
        up to ``within`` seconds; those left are counted ``dropped`` when the worker stops."""
        if self.shadow is None:
            return
        try:
            async with asyncio.timeout(max(within, 0.0)):
                await self.shadow.join()
            log.info("stopping: shadow reads drained")
        except TimeoutError:
            left = self.shadow.unreported if isinstance(self.shadow, ShadowLink) else None
            log.warning(
                "stopping: shadow reads not drained within %.1f s (%s left): counted dropped",
                within,
                "some" if left is None else left,
            )


async def reload_from(replica: Replica, path: Path) -> bool:
    """SIGHUP: read ``path`` again and run on it if only what may change live changed;
    otherwise keep the running configuration and say which key needs a restart."""
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error("configuration not reloaded, the running one stays: %s", exc)
        return False
    refusal = reload_refusal(replica.config, new)
    if refusal is not None:
        log.error("configuration not reloaded from %s: %s", path, refusal)
        return False
    changed = changed_keys(replica.config, new)
    await replica.reload(new)
    log.info(
        "configuration reloaded from %s: %s",
        path,
        ", ".join(changed) if changed else "nothing changed",
    )
    return True


async def serve(
    config: Config,
    secrets: Secrets,
    listen: str,
    admin_listen: str,
    config_path: Path | None = None,
    *,
    shared_ports: bool = False,
) -> None:
    """One replica until SIGTERM or SIGINT, then a graceful stop (:func:`_stop`); SIGHUP
    reloads ``config_path`` (:func:`reload_from`). ``shared_ports``: a worker of
    ``--workers N``, binding both ports with ``SO_REUSEPORT``."""
    if not secrets.operators():
        log.warning(
            "no operator token (BASCULE_ADMIN_TOKEN or BASCULE_OPERATOR_TOKENS) is set: "
            "the admin API will refuse every change"
        )
    # Signals are caught from the start: one arriving while the replica starts stops it
    # once it has started, rather than killing it half-open.
    signals = Signals()
    with provide_stores(config.state.postgres_url, config.state.redis_url, embed=False) as found:
        log.info("state stores: %s", found.describe())
        async with Replica(config, secrets, found.postgres_url, found.redis_url) as replica:
            researcher = replica.server()
            host, _, port = listen.rpartition(":")
            try:
                await researcher.start(
                    host,
                    int(port),
                    tls=server_context("proxy.tls", config.proxy.tls),
                    reuse_port=shared_ports,
                )
            except OSError as exc:
                raise UsageError(
                    f"cannot listen on {listen} for researchers: {exc.strerror}"
                ) from exc
            log.info(
                "researcher port listening on %s%s (replica %s)",
                listen,
                " (TLS)" if config.proxy.tls else "",
                replica.name,
            )
            admin = await _start(
                create_admin_app(replica.admin_deps()),
                admin_listen,
                "admin",
                server_context("proxy.admin_tls", config.proxy.admin_tls),
                shared_ports,
            )
            _reload_on_sighup(replica, config_path)
            try:
                await signals.stop.wait()
                await _stop(replica, researcher, config.proxy, signals)
            finally:
                await researcher.close(grace=0)
                await admin.cleanup()
    log.info("stopped")


class Signals:
    """SIGTERM and SIGINT, caught: the first of either starts the stop (``stop``); SIGINT
    (a person at a terminal) also cuts the pre-stop window short (``hurry``). Repeats are
    harmless: a service manager and the supervisor may both send SIGTERM."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self.received: str | None = None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._got, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self._got, signal.SIGINT)

    def _got(self, sig: signal.Signals) -> None:
        if self.received is None:
            self.received = sig.name
        if sig is signal.SIGINT:
            self.hurry.set()
        self.stop.set()


async def _stop(
    replica: Replica, researcher: Server, settings: ProxySettings, signals: Signals
) -> None:
    """The graceful stop (docs/operations.md): not ready at once; new requests still served
    for ``prestop_seconds`` (answers close their connections, so clients come back through
    the load balancer, which by then sends them elsewhere); then the listener closes and the
    requests in flight (journaled writes included) and the shadow reads get ``drain_seconds``
    to finish. Every step is logged; the process then exits 0."""
    replica.stopping = True
    researcher.draining = True
    window = 0.0 if signals.hurry.is_set() else settings.prestop_seconds
    log.info(
        "%s: not ready; serving new requests for %.1f s more, then draining (up to %.1f s)",
        signals.received,
        window,
        settings.drain_seconds,
    )
    if window > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(window):
                await signals.hurry.wait()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.drain_seconds
    cut = await researcher.close(grace=settings.drain_seconds)
    if cut:
        log.error(
            "stopping: %d request(s) still in flight after %.1f s were cut off (their "
            "journaled writes are settled by the resolver)",
            cut,
            settings.drain_seconds,
        )
    else:
        log.info("stopping: listener closed, requests in flight finished")
    await replica.drain_shadow(deadline - loop.time())


async def _start(
    app: web.Application,
    address: str,
    what: str,
    tls: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> web.AppRunner:
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(
            runner, host, int(port), backlog=1024, ssl_context=tls, reuse_port=reuse_port or None
        ).start()
    except OSError as exc:
        await runner.cleanup()
        raise UsageError(f"cannot listen on {address} for the {what} port: {exc.strerror}") from exc
    log.info("%s port listening on %s%s", what, address, " (TLS)" if tls else "")
    return runner


def _reload_on_sighup(replica: Replica, path: Path | None) -> None:
    """SIGHUP reloads ``path`` (:func:`reload_from`), one reload at a time."""
    if path is None:
        return
    loop = asyncio.get_running_loop()
    lock = asyncio.Lock()

    async def reload() -> None:
        async with lock:
            await reload_from(replica, path)

    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(reload(), name="reload"))
