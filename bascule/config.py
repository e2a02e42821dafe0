"""The configuration: one TOML file read once into frozen, typed, self-validating records.

Types and unknown keys are checked by msgspec (``forbid_unknown_fields``, strict types); the
rules that span keys (a route's dataset, the migration's backends, pointers…) are checked here.
Every error is a :class:`ConfigError` naming the file, the dotted key and what was expected.

Secrets never live in the file: tokens and keys come from the environment (:class:`Secrets`),
and a backend names the variable holding its service credential (``credential_env``).
"""

from __future__ import annotations

import math
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from bascule.errors import ConfigError

T = TypeVar("T")

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
DEFAULT_DATASET = "default"
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}\Z")  # \Z: `$` lets a trailing \n by
_PARAM = re.compile(r"^\{([a-z_][a-z0-9_]*)\}\Z")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*\Z")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}\Z")
MAX_WORKERS = 64
"""``[proxy] workers`` at most: each worker holds its own state-database sessions."""


class _Record(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every configuration record: immutable, typed, no unknown keys."""


class ProxySettings(_Record, frozen=True):
    listen: str = "127.0.0.1:8080"
    """Researcher-facing address, host:port."""
    admin_listen: str = "127.0.0.1:8081"
    """Admin API address (token-protected), host:port."""
    max_body_bytes: int = 10 * 1024 * 1024
    """Largest request body accepted (413 beyond)."""
    receive_timeout: float = 60.0
    """Seconds a researcher's request has to arrive whole once its first byte came (408 past
    it): a slow client cannot hold a connection and its buffers for longer."""
    idle_timeout: float = 75.0
    """Seconds a kept-alive researcher connection may wait for its next request."""
    credentials_header: str = "authorization"
    """The request header that carries a researcher's credentials: a write without it (or
    with it empty) is *anonymous*."""
    require_credentials: bool = False
    """Refuse an anonymous write with 401 ``credentials_required`` before it is journaled or
    takes any lock (off: the authoritative backend judges it, and a refusal leaves no body in
    the journal). On whenever every legitimate write carries credentials."""
    anonymous_writes: int = 4
    """Anonymous writes in flight at once on a replica, all clients together; more get 429
    ``too_many_anonymous_writes`` (with ``Retry-After``) before the journal, so that clients
    without credentials cannot hold the journal's sessions and locks writers need."""
    tls: ListenerTLS | None = None
    """TLS on the researcher port (``[proxy.tls]``): certificate and key files (or variables)."""
    admin_tls: ListenerTLS | None = None
    """TLS on the admin port (``[proxy.admin_tls]``), optionally requiring client certificates."""

    # -- Where it runs: workers and graceful stop (docs/decisions.md) --------------------------
    workers: int = 1
    """Serving processes on this replica's ports (``SO_REUSEPORT``), each its own replica in
    ``bascule status``; more than 1 adds a parent process that supervises them (restarts a
    dead one). ``bascule proxy --workers N`` overrides it."""
    prestop_seconds: float = 5.0
    """On SIGTERM: seconds the replica keeps serving new requests after ``/readyz`` turned
    false, so load balancers notice it first (0: close the listener at once)."""
    drain_seconds: float = 20.0
    """On SIGTERM, once the listener is closed: seconds requests in flight (journaled writes
    included) have to finish, and the shadow queue to drain; past it what is left is cut off
    (its writes are settled by the resolver) and the shadow reads left are counted dropped."""


class StateSettings(_Record, frozen=True):
    postgres_url: str | None = None
    """bascule's own state database; ``BASCULE_POSTGRES_URL`` overrides it."""
    redis_url: str | None = None
    """Fleet fast path (pub/sub, counters, leases); ``BASCULE_REDIS_URL`` overrides it."""
    redis_prefix: str = "bascule:"
    poll_interval: float = 1.0
    """Seconds between polls of the stage table (bounds how late a lost message makes a flip)."""
    journal_sessions: int = 3
    """State-database sessions per replica for writes in dual-write stages: each write in
    flight holds one (it holds the record's lock). More concurrent writes wait for one, at
    most ``session_wait`` seconds (see the connection budget in docs/operations.md)."""
    sessions: int = 3
    """State-database sessions of the replica's main pool: stage reads and reports, the
    replayer and resolver, the controller, the switch (a change holds one for its fence), the
    shadow reads' counts, the admin API."""
    shadow_sessions: int = 3
    """State-database sessions of the shadow reads (the worker process's): one for noise
    observations, the others for the race guard and the database clock."""
    session_wait: float = 10.0
    """Seconds a write waits for a journal session (all ``journal_sessions`` busy) before it
    is refused with 503 ``journal_unavailable``, before reaching any backend: as long as it
    may wait for its record's lock. A server refusing new sessions refuses it at once."""
    orphan_grace: float = 30.0
    """Seconds past a write's deadline before the write of a vanished replica is read back from
    the authoritative side (a backend may finish a request its client gave up on)."""
    journal_retention: float = 7 * 24 * 3600.0
    """Seconds settled journal entries (sealed bodies of health data) are kept, then purged."""
    stale_after: float = 30.0
    """Seconds a replica that cannot read the stages keeps reporting ready (it keeps serving
    reads on its last known stages either way)."""
    dead_session_after: float = 30.0
    """Seconds after which a state-database session that stopped answering (a partition, a
    replica's host gone) is dropped by both ends, with the record locks and write fences it
    held: TCP keepalive probes and ``TCP_USER_TIMEOUT`` on both sides of every state session
    (``bascule/state/postgres.py``). Postgres' own default would keep them two hours."""


class SwitchSettings(_Record, frozen=True):
    """How a change that alters writes behaves (``[switch]``); see ``cutover/switch.py``."""

    hold: float = 5.0
    """Seconds new writes may be held during a change (waiting for writes in flight, then
    draining the backlog toward a new authority); past it the change gives up."""
    small_backlog: int = 100
    """An authority switch starts its barrier once the backlog toward the new authority is
    under this many entries."""
    backlog_wait: float = 60.0
    """Seconds an authority switch waits for that before giving up."""
    confirm_wait: float = 30.0
    """Seconds a change waits for every live replica to confirm it (a replica stops counting
    once its lease runs out)."""
    seen_within: float = 600.0
    """Seconds back a change looks for replicas: each one that reported since and has not
    confirmed the change is named in its result, its lease run out or not (cut off, frozen),
    with when its stages go stale."""


class ControllerSettings(_Record, frozen=True):
    """The controller (``[controller]``; ``cutover/autopilot.py``): one replica of the fleet,
    holding a lease, promotes datasets whose gate holds and rolls back a diverging ``live``."""

    interval: float = 5.0
    """Seconds between the controller's rounds."""
    lease: float = 15.0
    """Seconds the controller's lease lasts; another replica takes over that long after its
    holder stopped renewing it."""


class ShadowSettings(_Record, frozen=True):
    """How shadow reads run on each replica (``[shadow]``); see ``shadow/dispatch.py``. A shadow
    read is off the researcher's path: these bound what it may cost, never what researchers see."""

    queue: int = 1000
    """Shadow reads waiting for a worker; one more is dropped (and counted ``dropped``)."""
    concurrency: int = 16
    """Shadow reads in flight at once on this replica."""
    deadline: float = 5.0
    """Seconds the shadowed side has to answer a shadow read (past it: ``errored``)."""
    lag_wait: float = 2.0
    """Seconds a shadow read waits for the shadowed side to apply the writes the serving side
    had answered with (past it: ``skipped_lagging``)."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Largest answer compared; a larger one is not shadow-read (counted ``skipped_large``)."""
    worker: Literal["process", "inline"] = "process"
    """``process``: shadow reads run in a worker process of their own (``shadow/worker.py``),
    so that their I/O and comparisons never hold the researchers' event loop; ``inline``: in
    the proxy's own event loop (tests that look inside the dispatcher)."""
    priority: Literal["idle", "low", "normal"] = "idle"
    """CPU priority of the worker process: ``idle`` (SCHED_IDLE: CPU researchers leave
    unused), ``low`` (nice 19) or ``normal``. A replica that researchers keep busy then drops
    its shadow reads, counted ``dropped``, rather than slow them down."""


class TelemetrySettings(_Record, frozen=True):
    """Traces, metrics and logs for on-call (``[telemetry]``; ``docs/observability.md``).
    Nothing exported ever carries a record value: datasets, route templates, outcomes, JSON
    pointers and kinds only."""

    enabled: bool = True
    """False: no span and no metric is made (``/metrics`` has none of bascule's); backends
    still get a ``traceparent`` and log lines a trace id. A baseline for
    ``bench/proxy_overhead.py``, or a replica that must spend nothing on telemetry."""
    exporter: Literal["none", "console", "otlp-grpc", "otlp-http"] = "none"
    """Where spans (and, for OTLP, metrics) go: ``none`` (the Prometheus endpoint on the admin
    port only), ``console`` (spans as JSON on stderr), ``otlp-grpc`` or ``otlp-http`` (a
    collector: ``deploy/otel-collector.yaml``)."""
    endpoint: str | None = None
    """The collector's OTLP endpoint (``http://host:4317`` for gRPC, ``http://host:4318`` for
    HTTP); None: the exporter's default (``OTEL_EXPORTER_OTLP_ENDPOINT`` or localhost)."""
    sample_ratio: float = 0.01
    """Share of researchers' requests traced from the start (by trace id, so every process
    agrees). A failed request, a failed replay and a divergent shadow read are kept whatever
    this says."""
    metrics_interval: float = 15.0
    """Seconds between OTLP metric pushes (``otlp-*`` only)."""
    logs: Literal["auto", "json", "text"] = "auto"
    """``json``: one JSON object per line; ``text``: a line for people; ``auto``: text on a
    terminal, JSON otherwise."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be between 0 and 1, not {self.sample_ratio}")
        if self.metrics_interval <= 0:
            raise ValueError("metrics_interval must be more than 0 seconds")


class MigrationSettings(_Record, frozen=True):
    source: str
    target: str


class Backend(_Record, frozen=True):
    """One backend (``[backends.NAME]``) and the time bascule gives it (``bascule/http1.py``).
    The defaults are no stricter than what researchers live with behind nginx (60 s without a
    byte); a route may give its requests more (``[[routes]] read_timeout, total_timeout``)."""

    url: str
    """Base URL, e.g. ``http://10.0.0.5:8000``; request paths are appended unchanged."""
    connect_timeout: float = 2.0
    """Seconds to open a connection."""
    read_timeout: float = 60.0
    """Seconds the backend may stay silent: the clock restarts with every byte received, so a
    slow answer that keeps streaming is never cut by it (nginx's ``proxy_read_timeout``)."""
    total_timeout: float = 3600.0
    """Seconds a read may take whole: waiting for a connection, connecting, the answer's last
    byte. A bound on an answer that trickles forever, not on real ones."""
    write_timeout: float = 120.0
    """Seconds a write may take whole (researchers' writes, replays, the resolver's calls):
    the bound the journal counts on, so it also sets how long a dead replica's write waits
    before it is read back (plus ``[state] orphan_grace``) and how soon a replay lease whose
    holder died is taken over."""
    pool_timeout: float = 5.0
    """Seconds a request waits for one of the ``pool_size`` connections before it is refused
    (503 ``backend_busy``)."""
    keepalive_timeout: float = 4.0
    """Seconds an idle connection may be reused: set it below the backend's own keep-alive
    timeout, or a request may go out on a connection the backend is closing (a write sent so is
    in doubt). 0: never reuse one."""
    pool_size: int = 100
    database: str | None = None
    """Optional DSN of the backend's database, used only by ``bascule verify``."""
    credential_env: str | None = None
    """Name of the environment variable holding bascule's service credential for this backend."""
    tls: BackendTLS | None = None
    """How an ``https://`` backend is verified, and bascule's client certificate for it
    (``[backends.NAME.tls]``); without it, the system's CAs and no client certificate."""


class CompareRules(_Record, frozen=True):
    headers: tuple[str, ...] = ("content-type",)
    """Response headers compared (case-insensitive); all others are ignored."""
    ignore: tuple[str, ...] = ()
    """JSON pointers never compared; ``*`` matches one segment (``/records/*/served_at``)."""
    unordered: dict[str, str] = {}
    """Arrays compared as sets: pointer -> key field that identifies an element."""
    numeric_tolerance: float = 0.0
    """Absolute difference under which two numbers are equal."""
    timestamps_as_instants: bool = True
    """Two timestamps are equal when they denote the same instant, whatever their offset."""


class GateSettings(_Record, frozen=True):
    """When a dataset may move forward past ``shadow`` (``cutover/gate.py``)."""

    min_compared: int = 1000
    """Comparisons needed in the window before a move past ``shadow``."""
    window: float = 3600.0
    """Seconds of evidence the gate looks at: the current stage must have been in effect that
    long, and its evidence is read from then on (never before the stage took effect)."""
    live_mismatch_budget: int = 0
    """Mismatches tolerated in ``live`` before an automatic rollback to ``shadow``."""
    replay_grace: float = 5.0
    """Seconds a journaled write may wait for its replay before it counts as backlog: a write
    being replayed right now is not one (under steady writes the backlog is never empty)."""
    verification: bool = True
    """Whether the gate wants a clean stored-data verification newer than the last gap.
    ``false`` only where bascule cannot reach the backends' databases; the gate then says so
    in every answer, and each move's audit records it."""


class IdAllocation(_Record, frozen=True):
    """Where a backend allocates a dataset's ids: at an authority switch, the new authority's
    sequence is moved past every id the other side holds (through the backends' ``database``)."""

    table: str
    sequence: str
    column: str = "id"


class Dataset(_Record, frozen=True):
    name: str = ""
    auto_promote: bool = False
    shadow_sample: float = 1.0
    """Share of read requests shadow-read in ``shadow`` and ``live`` (0..1)."""
    noise_sample: float = 0.01
    """Share of shadow-read requests whose serving side is also asked twice, to learn which
    pointers differ on their own (noise proposals; 0 turns learning off)."""
    noise_pairs: int = 3
    """Independent pairs a pointer must be seen differing in before it is proposed as noise."""
    group: str | None = None
    """Datasets in the same group move through the stages together."""
    compare: CompareRules = CompareRules()
    gate: GateSettings = GateSettings()
    ids: IdAllocation | None = None
    """How ids are allocated, if the backends assign them (see :class:`IdAllocation`)."""


class Route(_Record, frozen=True):
    path: str
    """Pattern of literal and ``{param}`` segments: ``/v1/datasets/{dataset}/records``."""
    methods: tuple[str, ...]
    kind: Literal["read", "write"]
    dataset: str | None = None
    """Fixed dataset, for a path with no ``{dataset}`` parameter."""
    key: str | None = None
    """Path parameter naming the record written or read (writes without one lock the dataset)."""
    key_format: Literal["text", "integer", "uuid"] = "text"
    """How the backend reads the key: with ``integer``, ``7``, ``07`` and ``007`` are one record
    (locked and ordered as one), and a key that is not digits is refused; with ``uuid``, a key
    in capitals, without hyphens or in braces is the uuid Postgres renders in lower case, and
    a key that is not a uuid is refused. Verification names records by the key as its
    database renders it, so it refuses a route whose format does not match the table's key
    type (``cutover/job.py``)."""
    create_id: str | None = None
    """JSON pointer to the server-assigned id in the authoritative answer to a create."""
    replay_as: str | None = None
    """How the write is replayed on the other side, carrying the authoritative side's answer as
    its body (``PUT /v1/datasets/{dataset}/records/{id}``): for creates, whose id the server
    assigns, and for writes whose server-set fields (``updated_at``) must be the same on both
    sides. Without it, the researcher's request is replayed as it was."""
    idempotent_backend: bool = False
    """The backend honours ``Idempotency-Key`` here, so an in-doubt write may be re-sent."""
    compare: CompareRules | None = None
    """Comparison rules for this route, replacing the dataset's."""
    read_timeout: float | None = None
    """Seconds the backend may stay silent on this route (an aggregate that computes before
    it answers), replacing the backend's ``read_timeout``."""
    total_timeout: float | None = None
    """Seconds a request of this route may take whole, replacing the backend's
    ``total_timeout`` (a read) or ``write_timeout`` (a write)."""

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(m.group(1) for s in self.path.split("/") if (m := _PARAM.match(s)))


class Secrets(_Record, frozen=True):
    """Secrets, read from the environment only."""

    admin_token: str | None = None
    viewer_token: str | None = None
    operator_tokens: dict[str, str] = {}
    """Named operator tokens (``BASCULE_OPERATOR_TOKENS=alice=…,bob=…``): the name is what the
    audit records as who made a change through the admin API."""
    hmac_key: bytes | None = None
    journal_key: bytes | None = None

    ENV = {
        "admin_token": "BASCULE_ADMIN_TOKEN",
        "viewer_token": "BASCULE_VIEWER_TOKEN",
        "operator_tokens": "BASCULE_OPERATOR_TOKENS",
        "hmac_key": "BASCULE_HMAC_KEY",
        "journal_key": "BASCULE_JOURNAL_KEY",
    }

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Secrets:
        keys: dict[str, bytes | None] = {}
        for field in ("hmac_key", "journal_key"):
            raw = env.get(cls.ENV[field])
            if raw is None or raw == "":
                keys[field] = None
                continue
            try:
                value = bytes.fromhex(raw)
            except ValueError:
                raise ConfigError(
                    "environment",
                    cls.ENV[field],
                    "expected hex digits (e.g. `openssl rand -hex 32`)",
                ) from None
            if len(value) < 32:
                raise ConfigError(
                    "environment", cls.ENV[field], f"expected at least 32 bytes, got {len(value)}"
                )
            keys[field] = value
        for field in ("admin_token", "viewer_token"):
            token = env.get(cls.ENV[field])
            if token is not None and 0 < len(token) < 16:
                raise ConfigError("environment", cls.ENV[field], "expected at least 16 characters")
            if token and not _sendable(token):
                raise ConfigError("environment", cls.ENV[field], _UNSENDABLE)
        named: dict[str, str] = {}
        for item in filter(None, (env.get(cls.ENV["operator_tokens"]) or "").split(",")):
            name, sep, token = item.partition("=")
            if not sep or not _NAME.match(name.strip()) or len(token.strip()) < 16:
                raise ConfigError(
                    "environment",
                    cls.ENV["operator_tokens"],
                    "expected name=token pairs separated by commas, names in lower case, "
                    "tokens of at least 16 characters",
                )
            if not _sendable(token.strip()):
                raise ConfigError(
                    "environment", cls.ENV["operator_tokens"], f"{name.strip()}: {_UNSENDABLE}"
                )
            named[name.strip()] = token.strip()
        return cls(
            admin_token=env.get(cls.ENV["admin_token"]) or None,
            viewer_token=env.get(cls.ENV["viewer_token"]) or None,
            operator_tokens=named,
            hmac_key=keys["hmac_key"],
            journal_key=keys["journal_key"],
        )

    def operators(self) -> dict[str, str]:
        """Every operator token by the name the audit records (``operator`` for the shared one)."""
        tokens = dict(self.operator_tokens)
        if self.admin_token:
            tokens.setdefault("operator", self.admin_token)
        return tokens

    def require(self, field: str) -> Any:
        value = getattr(self, field)
        if value is None:
            raise ConfigError("environment", self.ENV[field], "not set, and this command needs it")
        return value


_UNSENDABLE = (
    "a token is printable ASCII without spaces (what an Authorization header can carry); "
    "e.g. `openssl rand -hex 24`"
)


def _sendable(token: str) -> bool:
    """Whether ``token`` can travel in an ``Authorization: Bearer`` header as itself: a token
    with another character was accepted at start, then failed every comparison (500)."""
    return all("!" <= c <= "~" for c in token)


class Config(_Record, frozen=True):
    source: str
    """The file this came from, for messages."""
    proxy: ProxySettings
    state: StateSettings
    migration: MigrationSettings
    backends: dict[str, Backend]
    routes: tuple[Route, ...]
    datasets: dict[str, Dataset]
    switch: SwitchSettings = SwitchSettings()
    shadow: ShadowSettings = ShadowSettings()
    controller: ControllerSettings = ControllerSettings()
    telemetry: TelemetrySettings = TelemetrySettings()

    @property
    def source_backend(self) -> Backend:
        return self.backends[self.migration.source]

    @property
    def target_backend(self) -> Backend:
        return self.backends[self.migration.target]

    def dataset(self, name: str) -> Dataset:
        """The named dataset's settings; an undeclared one runs on the ``default`` settings."""
        return self.datasets.get(name) or self.datasets[DEFAULT_DATASET]


_TOP_KEYS = (
    "proxy",
    "state",
    "migration",
    "backends",
    "routes",
    "datasets",
    "defaults",
    "switch",
    "shadow",
    "controller",
    "telemetry",
)


def load_config(path: str | Path) -> Config:
    """Read and validate ``path``. Raises :class:`ConfigError` naming the file and key."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read the file: {exc.strerror}") from None
    return parse_config(text, source)


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"not valid TOML: {exc}") from None
    _refuse_inline_pem(raw, source, "")
    for key in raw:
        if key not in _TOP_KEYS:
            raise ConfigError(
                source, key, f"unknown section; expected one of {', '.join(_TOP_KEYS)}"
            )

    proxy = _convert(raw.get("proxy", {}), ProxySettings, source, "proxy")
    state = _convert(raw.get("state", {}), StateSettings, source, "state")
    if "migration" not in raw:
        raise ConfigError(
            source, "migration", "missing; expected a table with `source` and `target`"
        )
    migration = _convert(raw["migration"], MigrationSettings, source, "migration")
    switch = _convert(raw.get("switch", {}), SwitchSettings, source, "switch")
    shadow = _convert(raw.get("shadow", {}), ShadowSettings, source, "shadow")
    controller = _convert(raw.get("controller", {}), ControllerSettings, source, "controller")
    telemetry = _convert(raw.get("telemetry", {}), TelemetrySettings, source, "telemetry")

    backends_raw = _table(raw.get("backends", {}), source, "backends")
    backends = {
        name: _convert(value, Backend, source, f"backends.{name}")
        for name, value in backends_raw.items()
    }

    defaults = _table(raw.get("defaults", {}), source, "defaults")
    _convert({**defaults, "name": DEFAULT_DATASET}, Dataset, source, "defaults")
    datasets_raw = _table(raw.get("datasets", {}), source, "datasets")
    datasets_raw.setdefault(DEFAULT_DATASET, {})
    datasets = {
        name: _convert(
            _merge(defaults, _table(value, source, f"datasets.{name}")) | {"name": name},
            Dataset,
            source,
            f"datasets.{name}",
        )
        for name, value in datasets_raw.items()
    }

    routes_raw = raw.get("routes", [])
    if not isinstance(routes_raw, list):
        raise ConfigError(source, "routes", "expected an array of tables ([[routes]])")
    routes = tuple(
        _convert(value, Route, source, f"routes[{i}]") for i, value in enumerate(routes_raw)
    )

    config = Config(
        source=source,
        proxy=proxy,
        state=state,
        migration=migration,
        backends=backends,
        routes=routes,
        datasets=datasets,
        switch=switch,
        shadow=shadow,
        controller=controller,
        telemetry=telemetry,
    )
    _check(config)
    return config


def _table(value: object, source: str, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(source, key, f"expected a table, got {type(value).__name__}")
    return value


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_LOCATION = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?P<where>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")


def _convert(value: object, kind: type[T], source: str, key: str) -> T:
    try:
        return msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError as exc:
        match = _LOCATION.match(str(exc))
        assert match is not None
        problem, where = match.group("problem"), match.group("where") or ""
        where = re.sub(r"\[(\d+)\]", r"[\1]", where).replace("[...]", ".<key>")
        full = key + where
        unknown = _UNKNOWN.match(problem)
        if unknown:
            raise ConfigError(source, f"{full}.{unknown.group('field')}", "unknown key") from None
        problem = problem.replace("Object missing required field", "missing required key")
        if problem.startswith("Invalid enum value"):
            choices = _literal_choices(kind, where)
            if choices:
                problem += f"; expected one of {', '.join(repr(c) for c in choices)}"
        problem = problem[0].lower() + problem[1:] if problem else problem
        raise ConfigError(source, full, problem) from None


def _literal_choices(kind: type[Any], where: str) -> tuple[object, ...]:
    """The allowed values of the Literal field at ``where`` (``.a.b``), for error messages."""
    hint: Any = kind
    for name in where.strip(".").split("."):
        try:
            hint = typing.get_type_hints(hint)[name]
        except (KeyError, TypeError, NameError):
            return ()
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _check(config: Config) -> None:
    """Rules that span several keys."""
    src = config.source
    _check_address(src, "proxy.listen", config.proxy.listen)
    _check_address(src, "proxy.admin_listen", config.proxy.admin_listen)
    if config.proxy.listen == config.proxy.admin_listen:
        raise ConfigError(src, "proxy.admin_listen", "must differ from proxy.listen")
    if config.proxy.max_body_bytes <= 0:
        raise ConfigError(src, "proxy.max_body_bytes", "expected a positive number of bytes")
    for field in ("receive_timeout", "idle_timeout"):
        _check_seconds(src, f"proxy.{field}", getattr(config.proxy, field))
    if not _HEADER_NAME.match(config.proxy.credentials_header):
        raise ConfigError(
            src, "proxy.credentials_header", "expected a header name (letters, digits, '-')"
        )
    if config.proxy.anonymous_writes < 1:
        raise ConfigError(src, "proxy.anonymous_writes", "expected at least 1")
    # Where it runs: workers and graceful stop.
    if not 1 <= config.proxy.workers <= MAX_WORKERS:
        raise ConfigError(src, "proxy.workers", f"expected 1 to {MAX_WORKERS}")
    _check_seconds(src, "proxy.prestop_seconds", config.proxy.prestop_seconds, zero="no window")
    _check_seconds(src, "proxy.drain_seconds", config.proxy.drain_seconds)
    if config.state.poll_interval <= 0:
        raise ConfigError(src, "state.poll_interval", "expected a positive number of seconds")
    if config.state.journal_retention < 600:
        # Shadow reads' race guard looks at writes settled since the read began: they must
        # outlive any shadow read (queue, deadline, lag_wait) by far.
        raise ConfigError(src, "state.journal_retention", "expected at least 600 seconds")
    if config.state.journal_sessions < 2:
        raise ConfigError(src, "state.journal_sessions", "expected at least 2")
    if not 2.0 <= config.state.dead_session_after <= 3600.0:
        raise ConfigError(src, "state.dead_session_after", "expected 2 to 3600 seconds")
    if config.state.stale_after <= config.state.poll_interval:
        raise ConfigError(src, "state.stale_after", "must be longer than state.poll_interval")
    for field in ("hold", "backlog_wait", "confirm_wait", "seen_within"):
        if getattr(config.switch, field) <= 0:
            raise ConfigError(src, f"switch.{field}", "expected a positive number of seconds")
    if config.switch.small_backlog < 1:
        raise ConfigError(src, "switch.small_backlog", "expected at least 1 entry")
    if config.controller.interval <= 0:
        raise ConfigError(src, "controller.interval", "expected a positive number of seconds")
    if config.controller.lease <= config.controller.interval:
        raise ConfigError(src, "controller.lease", "must be longer than controller.interval")
    for field in ("queue", "concurrency", "max_body_bytes"):
        if getattr(config.shadow, field) < 1:
            raise ConfigError(src, f"shadow.{field}", "expected a positive number")
    for field in ("deadline", "lag_wait"):
        if getattr(config.shadow, field) <= 0:
            raise ConfigError(src, f"shadow.{field}", "expected a positive number of seconds")

    for role in ("source", "target"):
        name = getattr(config.migration, role)
        if name not in config.backends:
            known = ", ".join(sorted(config.backends)) or "none"
            raise ConfigError(
                src, f"migration.{role}", f"backend {name!r} is not defined (backends: {known})"
            )
    if config.migration.source == config.migration.target:
        raise ConfigError(src, "migration.target", "must name a different backend than source")

    for name, backend in config.backends.items():
        _check_backend(src, name, backend)
    _check_where_it_runs(config)
    for name, dataset in config.datasets.items():
        _check_dataset(src, name, dataset)
    for i, route in enumerate(config.routes):
        _check_route(src, f"routes[{i}]", route, config.datasets)


def _check_address(src: str, key: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(src, key, f"expected host:port, got {value!r}")


def _check_seconds(src: str, key: str, value: float, *, zero: str | None = None) -> None:
    """A duration: finite and positive (or 0, where ``zero`` says what it means)."""
    if not math.isfinite(value) or value < 0 or (value == 0 and zero is None):
        expected = f"0 ({zero}) or more" if zero else "a positive number of"
        raise ConfigError(src, key, f"expected {expected} seconds, got {value!r}")


def _check_backend(src: str, name: str, backend: Backend) -> None:
    key = f"backends.{name}"
    if not _NAME.match(name):
        raise ConfigError(src, key, "backend names are lower-case letters, digits, '-' and '_'")
    if not re.match(r"^https?://[^/\s]+(/[^\s]*)?\Z", backend.url):
        raise ConfigError(
            src, f"{key}.url", f"expected an http:// or https:// URL, got {backend.url!r}"
        )
    for field in (
        "connect_timeout",
        "read_timeout",
        "total_timeout",
        "write_timeout",
        "pool_timeout",
    ):
        _check_seconds(src, f"{key}.{field}", getattr(backend, field))
    _check_seconds(src, f"{key}.keepalive_timeout", backend.keepalive_timeout, zero="never reuse")
    if backend.pool_size <= 0:
        raise ConfigError(src, f"{key}.pool_size", "expected a positive number of connections")
    if backend.credential_env is not None and not _ENV_NAME.match(backend.credential_env):
        raise ConfigError(
            src,
            f"{key}.credential_env",
            "expected the NAME of an environment variable (A-Z, 0-9, _)",
        )


def _check_dataset(src: str, name: str, dataset: Dataset) -> None:
    key = f"datasets.{name}"
    if not _NAME.match(name):
        raise ConfigError(src, key, "dataset names are lower-case letters, digits, '-' and '_'")
    if not 0.0 <= dataset.shadow_sample <= 1.0:
        raise ConfigError(src, f"{key}.shadow_sample", "expected a share between 0 and 1")
    if not 0.0 <= dataset.noise_sample <= 1.0:
        raise ConfigError(src, f"{key}.noise_sample", "expected a share between 0 and 1")
    if dataset.noise_pairs < 2:
        raise ConfigError(src, f"{key}.noise_pairs", "expected at least 2 independent pairs")
    if dataset.gate.min_compared < 0 or dataset.gate.live_mismatch_budget < 0:
        raise ConfigError(src, f"{key}.gate", "counts must not be negative")
    if dataset.gate.window <= 0:
        raise ConfigError(src, f"{key}.gate.window", "expected a positive number of seconds")
    if dataset.gate.replay_grace < 0:
        raise ConfigError(src, f"{key}.gate.replay_grace", "expected seconds, not negative")
    _check_compare(src, f"{key}.compare", dataset.compare)
    if dataset.ids is not None:
        for part in ("table", "sequence", "column"):
            if not _SQL_NAME.match(getattr(dataset.ids, part)):
                raise ConfigError(
                    src,
                    f"{key}.ids.{part}",
                    "expected a plain SQL name (lower case, digits, _; optionally schema.name)",
                )


_SQL_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}(\.[a-z_][a-z0-9_]{0,62})?\Z")


def _check_compare(src: str, key: str, rules: CompareRules) -> None:
    for pointer in (*rules.ignore, *rules.unordered):
        if not pointer.startswith("/"):
            raise ConfigError(
                src, key, f"{pointer!r} is not a JSON pointer (it must start with '/')"
            )
    for pointer in rules.ignore:
        if pointer == "/" or pointer.strip("/*") == "":
            raise ConfigError(src, f"{key}.ignore", f"{pointer!r} would ignore a whole document")
    if rules.numeric_tolerance < 0:
        raise ConfigError(src, f"{key}.numeric_tolerance", "must not be negative")


def _check_route(src: str, key: str, route: Route, datasets: Mapping[str, Dataset]) -> None:
    if not route.path.startswith("/"):
        raise ConfigError(
            src, f"{key}.path", f"expected a path starting with '/', got {route.path!r}"
        )
    segments = route.path.strip("/").split("/")
    for segment in segments:
        if ("{" in segment or "}" in segment) and not _PARAM.match(segment):
            raise ConfigError(
                src,
                f"{key}.path",
                f"segment {segment!r}: a parameter fills a whole segment, {{name}}",
            )
        if segment in ("", ".", ".."):
            raise ConfigError(src, f"{key}.path", f"empty or dot segment in {route.path!r}")
    params = route.params
    if len(set(params)) != len(params):
        raise ConfigError(src, f"{key}.path", "a parameter appears twice")
    has_param = "dataset" in params
    if not has_param and route.dataset is None:
        raise ConfigError(
            src,
            key,
            f"route {route.path!r} has no dataset: put {{dataset}} in its path or set `dataset`",
        )
    if has_param and route.dataset is not None:
        raise ConfigError(src, f"{key}.dataset", "the path already names the dataset ({dataset})")
    if route.dataset is not None and route.dataset not in datasets:
        raise ConfigError(src, f"{key}.dataset", f"unknown dataset {route.dataset!r}")
    if not route.methods:
        raise ConfigError(src, f"{key}.methods", "expected at least one HTTP method")
    for method in route.methods:
        if method not in HTTP_METHODS:
            raise ConfigError(
                src, f"{key}.methods", f"{method!r} is not one of {', '.join(sorted(HTTP_METHODS))}"
            )
    if route.key is not None and route.key not in params:
        raise ConfigError(src, f"{key}.key", f"{route.key!r} is not a parameter of {route.path!r}")
    if route.create_id is not None:
        if route.replay_as is None:
            raise ConfigError(src, key, "create_id and replay_as go together")
        if route.kind != "write":
            raise ConfigError(src, f"{key}.create_id", "only a write route creates records")
        if not route.create_id.startswith("/"):
            raise ConfigError(src, f"{key}.create_id", "expected a JSON pointer such as '/id'")
    if route.replay_as is not None:
        if route.kind != "write":
            raise ConfigError(src, f"{key}.replay_as", "only a write route is replayed")
        if route.create_id is None and route.key is None:
            raise ConfigError(
                src, f"{key}.replay_as", "needs create_id or key: which record does it replay?"
            )
        method, _, path = route.replay_as.partition(" ")
        if method not in HTTP_METHODS or not path.startswith("/"):
            raise ConfigError(
                src, f"{key}.replay_as", f"expected 'METHOD /path/{{id}}', got {route.replay_as!r}"
            )
        replay_params = Route(path=path, methods=(method,), kind="write").params
        if route.create_id is not None and "id" not in replay_params:
            raise ConfigError(src, f"{key}.replay_as", "the replay path must contain {id}")
        allowed = set(params) | ({"id"} if route.create_id is not None else set())
        missing = set(replay_params) - allowed
        if missing:
            raise ConfigError(
                src,
                f"{key}.replay_as",
                f"parameters not in the route path: {', '.join(sorted(missing))}",
            )
    for field in ("read_timeout", "total_timeout"):
        if getattr(route, field) is not None:
            _check_seconds(src, f"{key}.{field}", getattr(route, field))
    if route.compare is not None:
        if route.kind != "read":
            raise ConfigError(src, f"{key}.compare", "only read routes are compared")
        _check_compare(src, f"{key}.compare", route.compare)


# -- Where it runs: TLS, reload, sessions (issue 18) ------------------------------------------
# TLS to each backend and on bascule's own ports, the state-Postgres session budget's checks,
# and what a reload (SIGHUP) may change. Key material is never in the file: a file named here
# or an environment variable named here holds it (bascule/tls.py reads them).

_PEM = "-----BEGIN"


class BackendTLS(_Record, frozen=True):
    """``[backends.NAME.tls]``: the backend's URL is ``https://``, its certificate is checked
    against ``ca_file`` (or ``ca_env``; default: the system's CAs) and the URL's host name,
    and bascule presents ``cert_file``/``key_file`` (or ``cert_env``/``key_env``) where the
    backend wants a client certificate (mTLS)."""

    ca_file: str | None = None
    """PEM bundle of the CAs trusted for this backend (instead of the system's)."""
    ca_env: str | None = None
    """Name of an environment variable holding that PEM bundle."""
    cert_file: str | None = None
    """bascule's client certificate (PEM, chain included) for this backend."""
    cert_env: str | None = None
    key_file: str | None = None
    """Its private key (PEM, unencrypted: keep the file readable by bascule only)."""
    key_env: str | None = None


class ListenerTLS(_Record, frozen=True):
    """``[proxy.tls]`` / ``[proxy.admin_tls]``: TLS on one of bascule's ports."""

    cert_file: str | None = None
    """The port's certificate (PEM, chain included)."""
    cert_env: str | None = None
    key_file: str | None = None
    """Its private key (PEM, unencrypted)."""
    key_env: str | None = None
    client_ca_file: str | None = None
    """Require a client certificate signed by one of these CAs (PEM bundle)."""
    client_ca_env: str | None = None


def _refuse_inline_pem(value: object, source: str, key: str) -> None:
    """Key material pasted in the file is refused wherever it is, naming the key: a TOML file
    travels (ConfigMaps, repositories, tickets) where a private key must not."""
    if isinstance(value, dict):
        for name, item in value.items():
            _refuse_inline_pem(item, source, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_inline_pem(item, source, f"{key}[{i}]")
    elif isinstance(value, str) and _PEM in value:
        raise ConfigError(
            source,
            key,
            "inline PEM (certificate or key material) is refused: keys never live in the "
            "configuration file; put it in a file and name the file (`*_file`), or in an "
            "environment variable and name the variable (`*_env`)",
        )


def _check_pair(src: str, key: str, tls: BackendTLS | ListenerTLS, part: str) -> bool:
    """``part_file`` and ``part_env`` are exclusive; the env name is a name. Whether set."""
    file, env = getattr(tls, f"{part}_file"), getattr(tls, f"{part}_env")
    if file is not None and env is not None:
        raise ConfigError(src, f"{key}.{part}_env", f"set {part}_file or {part}_env, not both")
    if env is not None and not _ENV_NAME.match(env):
        raise ConfigError(
            src, f"{key}.{part}_env", "expected the NAME of an environment variable (A-Z, 0-9, _)"
        )
    if file is not None and not file.strip():
        raise ConfigError(src, f"{key}.{part}_file", "expected a file path")
    return file is not None or env is not None


def _check_where_it_runs(config: Config) -> None:
    src = config.source
    for name, backend in config.backends.items():
        if backend.tls is None:
            continue
        key = f"backends.{name}.tls"
        if not backend.url.startswith("https://"):
            raise ConfigError(src, key, f"TLS settings need an https:// url, got {backend.url!r}")
        _check_pair(src, key, backend.tls, "ca")
        cert = _check_pair(src, key, backend.tls, "cert")
        if cert != _check_pair(src, key, backend.tls, "key"):
            raise ConfigError(src, key, "a client certificate and its key go together")
    for field in ("tls", "admin_tls"):
        listener: ListenerTLS | None = getattr(config.proxy, field)
        if listener is None:
            continue
        key = f"proxy.{field}"
        if not _check_pair(src, key, listener, "cert") or not _check_pair(
            src, key, listener, "key"
        ):
            raise ConfigError(src, key, "expected a certificate and its key (cert_*, key_*)")
        _check_pair(src, key, listener, "client_ca")
    if config.state.sessions < 1:
        raise ConfigError(src, "state.sessions", "expected at least 1")
    if config.state.shadow_sessions < 2:
        # Noise observations hold one, the race guard and the clock the others.
        raise ConfigError(src, "state.shadow_sessions", "expected at least 2")
    if config.state.sessions < 2:
        # A change holds one for its fence while it reads and writes with another.
        raise ConfigError(src, "state.sessions", "expected at least 2")
    _check_seconds(src, "state.session_wait", config.state.session_wait)


RELOADABLE = (
    re.compile(r"^datasets\.[^.]+\.compare(\..*)?\Z"),
    re.compile(r"^datasets\.[^.]+\.(shadow_sample|noise_sample)\Z"),
    re.compile(r"^routes\[\d+\]\.(compare(\..*)?|read_timeout|total_timeout)\Z"),
    re.compile(r"^backends\.[^.]+\.(connect|read|total|write|pool|keepalive)_timeout\Z"),
    re.compile(r"^shadow\.(deadline|lag_wait)\Z"),
    re.compile(r"^proxy\.(receive|idle)_timeout\Z"),
)
"""What ``SIGHUP`` may change in a running replica: comparison rules, sampling, timeouts.
Anything else needs a restart (docs/operations.md)."""


def reload_refusal(old: Config, new: Config) -> str | None:
    """Why ``new`` cannot replace ``old`` in a running replica (None: it can): the first key
    that changed and needs a restart, named."""
    for key in changed_keys(old, new):
        if any(rule.match(key) for rule in RELOADABLE):
            continue
        return f"{key}: changing it needs a restart; the running configuration stays"
    return None


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ between two configurations (``source`` aside)."""
    keys = _changed_keys(msgspec.to_builtins(old), msgspec.to_builtins(new), "")
    return [k for k in keys if k != "source"]


def _changed_keys(old: object, new: object, key: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for name in sorted(set(old) | set(new), key=str):
            sub = f"{key}.{name}" if key else str(name)
            if name not in old or name not in new:
                found.append(sub)
            else:
                found += _changed_keys(old[name], new[name], sub)
        return found
    if isinstance(old, tuple | list) and isinstance(new, tuple | list) and key == "routes":
        if len(old) != len(new):
            return [key]
        pairs = enumerate(zip(old, new, strict=True))
        return [k for i, (a, b) in pairs for k in _changed_keys(a, b, f"{key}[{i}]")]
    return [] if old == new else [key]
