"""The stand-in's lab: tokens and a bascule configuration over two reference APIs, a migrated
state database — what the demo, tests and benchmarks build their worlds from."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import asyncpg

from bascule.config import Config, load_config
from bascule.stages import Stage
from bascule.state import schema
from bascule.state.postgres import open_pool
from bascule.state.servers import free_ports
from bascule.state.stage_store import StageRow, StageStore

RESEARCHER_TOKEN = "researcher-token-0123456789"
SERVICE_TOKEN = "service-token-0123456789abcdef"
OPERATOR_TOKEN = "operator-token-0123456789"
VIEWER_TOKEN = "viewer-token-0123456789"
DATASETS = ("default", "dcir", "pmsi", "cepidc")
POOL_SIZE = 6
"""Connections per reference API, and journal sessions per proxy, in a lab world: small, so
that two worlds at once (the tests' two workers, each running a two-proxy fleet) stay under a
Postgres server's 100 connections."""
AUTH = {"Authorization": f"Bearer {RESEARCHER_TOKEN}"}
JOURNAL_KEY = "11" * 32
HMAC_KEY = "22" * 32
# What a proxy of the lab is started with: the journal keys and the service token.
PROXY_ENV = {
    "BASCULE_JOURNAL_KEY": JOURNAL_KEY,
    "BASCULE_HMAC_KEY": HMAC_KEY,
    "BASCULE_TEST_SERVICE_TOKEN": SERVICE_TOKEN,
}


def write_config(
    path: Path,
    *,
    source_url: str,
    target_url: str,
    postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    poll_interval: float = 0.5,
    stale_after: float = 30.0,
    orphan_grace: float = 5.0,
    read_timeout: float = 5.0,
    write_timeout: float | None = None,
    backend_extra: str = "",
    max_body_bytes: int = 1024 * 1024,
    idempotent_creates: bool = False,
    databases: tuple[str, str] | None = None,
    extra: str = "",
    prestop_seconds: float = 0.0,
    proxy_extra: str = "",
    shadow_worker: str | None = "inline",
    journal_sessions: int = POOL_SIZE,
    open_gate: bool = True,
    controller_interval: float = 3600.0,
    dead_session_after: float = 30.0,
) -> Config:
    """A proxy config over the two backends. ``idempotent_creates``: the create route declares
    ``idempotent_backend`` (the backend honours Idempotency-Key there). ``databases``: the
    (source, target) databases of the reference APIs, so an authority switch moves dcir's id
    sequence past the other side's ids. ``shadow_worker``: ``[shadow] worker`` — ``inline`` by
    default, so that tests see inside the dispatcher and a replica costs no second process;
    the worker process has tests of its own (tests/shadow/test_worker.py); None: the
    product's default. ``open_gate``: every dataset's gate holds whatever the evidence (no
    comparisons, no window, no verification needed), so that a world can be moved through the
    stages; tests of the gate say ``False`` or set ``[datasets.X.gate]`` in ``extra``.
    ``controller_interval``: the controller's rounds; by default an hour apart, so that it acts
    only in tests that ask it to. ``write_timeout``: a write's whole time (by default
    ``connect_timeout + read_timeout``, so that orphans and replay leases settle in seconds);
    ``backend_extra``: lines added to both backends' tables. ``prestop_seconds``: none by
    default (no load balancer to warn in a lab: a stop closes the port at once);
    ``proxy_extra``: lines added to ``[proxy]``."""
    if write_timeout is None:
        write_timeout = 1.0 + read_timeout
    gate = (
        "[defaults.gate]\nmin_compared = 0\nwindow = 0.1\nverification = false\n"
        if open_gate
        else ""
    )
    source_db, target_db = databases or (None, None)
    if shadow_worker is not None:
        line = f'worker = "{shadow_worker}"\n'
        extra = (
            extra.replace("[shadow]\n", "[shadow]\n" + line, 1)
            if "[shadow]\n" in extra
            else f"{extra}\n[shadow]\n{line}"
        )
    ids = 'ids = { table = "dcir", sequence = "dcir_id_seq" }' if databases else ""
    listen, admin = free_ports(2)
    backends = "".join(
        f"""
[backends.{name}]
url = "{url}"
connect_timeout = 1.0
read_timeout = {read_timeout}
write_timeout = {write_timeout}
credential_env = "BASCULE_TEST_SERVICE_TOKEN"
{backend_extra}
{f'database = "{database}"' if database else ""}
"""
        for name, url, database in (
            ("azure", source_url, source_db),
            ("scaleway", target_url, target_db),
        )
    )
    path.write_text(
        f"""
[proxy]
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
max_body_bytes = {max_body_bytes}
prestop_seconds = {prestop_seconds}
{proxy_extra}

[state]
postgres_url = "{postgres_url}"
redis_url = "{redis_url}"
redis_prefix = "{redis_prefix}"
poll_interval = {poll_interval}
stale_after = {stale_after}
orphan_grace = {orphan_grace}
journal_sessions = {journal_sessions}
dead_session_after = {dead_session_after}

[controller]
interval = {controller_interval}
lease = {max(2 * controller_interval, controller_interval + 1.0)}

[migration]
source = "azure"
target = "scaleway"

{backends}
{gate}
[datasets.default]
[datasets.dcir]
{ids}
[datasets.pmsi]
[datasets.cepidc]

[[routes]]
path = "/v1/datasets"
methods = ["GET"]
kind = "read"
dataset = "default"

[[routes]]
path = "/v1/datasets/{{dataset}}/records"
methods = ["GET"]
kind = "read"

[[routes]]
path = "/v1/datasets/{{dataset}}/records"
methods = ["POST"]
kind = "write"
create_id = "/record/id"
replay_as = "PUT /v1/datasets/{{dataset}}/records/{{id}}"
idempotent_backend = {str(idempotent_creates).lower()}

[[routes]]
path = "/v1/datasets/{{dataset}}/records/{{id}}"
methods = ["GET"]
kind = "read"
key = "id"
key_format = "integer"

[[routes]]
path = "/v1/datasets/{{dataset}}/records/{{id}}"
methods = ["PUT", "PATCH"]
kind = "write"
key = "id"
key_format = "integer"
replay_as = "PUT /v1/datasets/{{dataset}}/records/{{id}}"

[[routes]]
path = "/v1/datasets/{{dataset}}/records/{{id}}"
methods = ["DELETE"]
kind = "write"
key = "id"
key_format = "integer"

[[routes]]
path = "/v1/datasets/{{dataset}}/query"
methods = ["POST"]
kind = "read"
{extra}
"""
    )
    return load_config(path)


async def migrate_state(postgres_url: str, datasets: Sequence[str] = DATASETS) -> None:
    """Migrate the state database and register ``datasets`` at ``source``."""
    conn = await asyncpg.connect(postgres_url)
    try:
        await schema.migrate(conn)
    finally:
        await conn.close()
    pool = await open_pool(postgres_url, max_size=1)
    try:
        await StageStore(pool).register(datasets, actor="test")
    finally:
        await pool.close()


async def walk(
    store: StageStore, dataset: str, *stages: Stage, actor: str = "test", reason: str = ""
) -> StageRow:
    """Move ``dataset`` through ``stages``, one at a time, through the store directly: the
    mechanism whatever the rules (gaps, fence, confirmations) — setting a world up, not an
    operator's move. The dataset's row at the end."""
    row = await store.get(dataset)
    for stage in stages:
        row = await store.change(dataset, row.version, stage, actor=actor, reason=reason or actor)
    return row
