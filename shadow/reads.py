"""A replica's shadow reads opened: their own backend pools, race guard, clock, ledger and noise.

The same set-up serves both ways of running them (``[shadow] worker``): in the proxy's event
loop, or in the worker process of :mod:`shadow.worker`, which opens its own stores with it.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from bascule.config import Config, Secrets
from bascule.sealing import Namer
from bascule.stages import Side
from bascule.state.journal.guard import RaceGuard
from bascule.state.postgres import StatelessConnection, open_pool, session_name
from bascule.upstream import Upstream
from shadow.dispatch import Dispatcher, JobDone, shadow_backend
from shadow.ledger import Ledger
from shadow.noise_store import NoiseStore


async def open_dispatcher(
    stack: AsyncExitStack,
    config: Config,
    secrets: Secrets,
    *,
    pool: Any,
    redis: Any,
    postgres_url: str,
    replica: str,
    done: JobDone | None = None,
) -> Dispatcher:
    """A started :class:`Dispatcher`, closed with ``stack``. ``pool`` and ``redis``: the state
    stores the ledger and the noise store write to. Needs ``secrets.hmac_key`` (a diff's
    pointers name members by keyed tokens); the race guard needs ``secrets.journal_key``
    too, as the write path does: without it no write is accepted where reads are shadowed."""
    assert secrets.hmac_key is not None
    settings = config.shadow
    # Pools of their own: a slow shadowed side must not take the connections researchers'
    # reads, writes and replays need.
    upstreams = {
        side: Upstream(
            f"{name} (shadow)",
            shadow_backend(backend, settings),
            side.value,
            key=f"backends.{name}",
        )
        for side, name, backend in (
            (Side.SOURCE, config.migration.source, config.source_backend),
            (Side.TARGET, config.migration.target, config.target_backend),
        )
    }
    for upstream in upstreams.values():
        await upstream.open()
        stack.push_async_callback(upstream.close)
    # The race guard and the clock on two sessions of their own: shadow reads never queue
    # behind (or hold back) the replayer, the resolver and stage reloads.
    guard_pool = await open_pool(
        postgres_url,
        # One statement of a few index probes per candidate mismatch; with one session, reads
        # of records under heavy writing queued behind it and were dropped (28% of them in
        # tests/shadow/test_dispatch.py's busy records): `shadow_sessions` - 1.
        max_size=max(1, config.state.shadow_sessions - 1),
        connection_class=StatelessConnection,
        application_name=session_name("shadow", replica),
        dead_session_after=config.state.dead_session_after,
    )
    stack.push_async_callback(guard_pool.close)
    guard = None
    if secrets.journal_key is not None:
        guard = RaceGuard(guard_pool).race
    namer = Namer(secrets.hmac_key)
    prefix = config.state.redis_prefix
    dispatcher = Dispatcher(
        config,
        Ledger(pool, redis, prefix),
        upstreams,
        lambda segment: namer.record("pointer", segment),
        guard=guard,
        clock_pool=guard_pool,
        noise=NoiseStore(pool, redis, prefix),
        done=done,
    )
    await dispatcher.start()
    stack.push_async_callback(dispatcher.stop)
    return dispatcher
