"""How every replica learns each dataset's stage: Postgres is the truth, Redis the fast path.

A change is announced on a Redis channel that every replica subscribes to; on a message a
replica re-reads the stages from Postgres. Replicas also poll Postgres every ``poll_interval``,
so a lost message, an emptied or restarted Redis only delays a flip by that interval. A replica
that can reach neither store keeps its last known stages and says so; one that never loaded
them is not ready. A configured dataset with no stage anywhere is an alarm, never ``source``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bascule.errors import StoreError
from bascule.stages import Stage
from bascule.state import replicas
from bascule.state.stage_store import StageRow, StageStore
from bascule.tasks import spawn

log = logging.getLogger("bascule.fleet")

CHANNEL = "stages"

PING_AFTER = 1.0
"""Seconds of silence on the stage channel after which the listener PINGs Redis."""
ANSWER_WITHIN = 3.0
"""Seconds Redis has to answer that PING, or the subscription: a Redis behind a silent
partition accepts nothing back and closes nothing, and would look healthy for ever."""
REDIS_TIMEOUT = 5.0
"""Seconds any other Redis command of a replica may wait for its answer (an announcement, a
flush of counters): past it, it fails and is logged, never hangs."""


class RedisSilent(TimeoutError):
    """Redis did not answer in time: a silent partition, or a Redis that hangs."""


def channel(prefix: str) -> str:
    return f"{prefix}{CHANNEL}"


class RedisAnnouncer:
    """Publishes stage changes. A failure is logged, not raised: replicas poll Postgres too."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    async def announce(self, row: StageRow) -> bool:
        message = orjson.dumps(
            {"dataset": row.dataset, "stage": row.stage.value, "version": row.version}
        )
        try:
            await self.client.publish(channel(self.prefix), message)
            return True
        except (RedisError, OSError) as exc:
            log.warning(
                "could not announce %s v%d on Redis (%s); replicas will poll",
                row.dataset,
                row.version,
                type(exc).__name__,
            )
            return False


@dataclass
class StoreHealth:
    ok: bool = False
    since: float = 0.0
    last_error: str | None = None

    def mark(self, ok: bool, error: str | None = None) -> None:
        if ok != self.ok or self.since == 0.0:
            self.since = time.time()
        self.ok = ok
        self.last_error = None if ok else error

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "since": self.since,
            "for_seconds": round(time.time() - self.since, 3) if self.since else None,
            "last_error": self.last_error,
        }


async def _answered(pubsub: Any, kind: str) -> None:
    """Wait for Redis's confirmation of a ``kind`` command on ``pubsub`` (a subscription)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ANSWER_WITHIN
    while (left := deadline - loop.time()) > 0:
        message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=left)
        if message is not None and message.get("type") == kind:
            return
    raise RedisSilent(f"Redis did not confirm the {kind} within {ANSWER_WITHIN:g} s")


class StageView:
    """A replica's view of the stages, kept fresh by Redis messages and Postgres polls."""

    def __init__(
        self,
        store: StageStore,
        redis_url: str,
        prefix: str,
        poll_interval: float,
        datasets: Collection[str],
        stale_after: float = 30.0,
        replica: str | None = None,
    ) -> None:
        self.store = store
        self.redis_url = redis_url
        self.prefix = prefix
        self.poll_interval = poll_interval
        self.stale_after = stale_after
        self.datasets = frozenset(datasets)
        self.stages: dict[str, StageRow] = {}
        self.loaded_at: float | None = None
        self.applied_at: dict[str, float] = {}
        """When (wall clock) this replica first read each dataset's current stage version:
        where a flip's propagation is measured (``bench/fleet.py``)."""
        self.postgres = StoreHealth()
        self.redis = StoreHealth()
        self._reload_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.replica = replica
        """This replica's name: set, it reports the versions it runs
        (``bascule/state/replicas.py``)."""
        self.report_lease = max(3 * poll_interval, 2.0)

    async def start(self) -> None:
        await self.reload()
        self._tasks = [
            spawn(self._poll(), name="stage-poll"),
            spawn(self._listen(), name="stage-listen"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        if self.replica is not None:
            with contextlib.suppress(StoreError):
                await replicas.withdraw(self.store.pool, self.replica)
        for task in self._tasks:
            # redis-py can swallow a cancellation that lands inside its read timeout
            # (redis/redis-py#2028, #2551): cancel until the task has really ended.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def get(self, dataset: str) -> StageRow | None:
        return self.stages.get(dataset)

    def any_past_source(self) -> bool:
        """True unless every dataset is known to be at ``source`` (unknown counts as past)."""
        if self.missing or self.loaded_at is None:
            return True
        return any(row.stage is not Stage.SOURCE for row in self.stages.values())

    @property
    def missing(self) -> list[str]:
        return sorted(self.datasets - self.stages.keys()) if self.loaded_at else []

    @property
    def stale(self) -> bool:
        """The stages were last read longer ago than ``stale_after``."""
        return self.loaded_at is None or time.time() - self.loaded_at > self.stale_after

    @property
    def watching(self) -> bool:
        """Both the poll and the listener are running (a dead one would freeze the stages)."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    @property
    def ready(self) -> bool:
        return not self.stale and not self.missing and self.watching

    def detail(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "stages_loaded": self.loaded_at is not None,
            "stale": self.stale,
            "watching": self.watching,
            "stages_age_seconds": (
                round(time.time() - self.loaded_at, 3) if self.loaded_at else None
            ),
            "serving_last_known_stages": self.loaded_at is not None and not self.postgres.ok,
            "missing_stages": self.missing,
            "postgres": self.postgres.as_json(),
            "redis": self.redis.as_json(),
            "stages": {name: row.stage.value for name, row in sorted(self.stages.items())},
            "versions": {name: row.version for name, row in sorted(self.stages.items())},
            "applied_at": {
                name: round(self.applied_at[name], 6)
                for name in sorted(self.stages)
                if name in self.applied_at
            },
        }

    async def reload(self) -> bool:
        """Read every stage from Postgres; keep the last known ones if that fails."""
        async with self._reload_lock:
            try:
                rows = await self.store.all()
            except StoreError as exc:
                if self.postgres.ok or self.postgres.since == 0.0:
                    log.warning("%s; serving last known stages", exc)
                self.postgres.mark(False, str(exc))
                return False
            self.postgres.mark(True)
            # Postgres is the truth, read under the lock so reloads cannot overtake each other:
            # a row that vanished is dropped (its requests get 503 stage_missing), and a version
            # that went backwards is an alarm, though Postgres still wins.
            for name, row in rows.items():
                current = self.stages.get(name)
                if current is not None and row.version < current.version:
                    log.error(
                        "ALARM: stage of %s went back from version %d to %d",
                        name,
                        current.version,
                        row.version,
                    )
            for name in self.stages.keys() - rows.keys():
                log.error("ALARM: the stage row of %s disappeared from Postgres", name)
            now = time.time()
            for name, row in rows.items():
                current = self.stages.get(name)
                if current is None or current.version != row.version:
                    self.applied_at[name] = now
            self.stages = dict(rows)
            self.loaded_at = now
            if self.replica is not None:
                # Right after a reload, so a flip announced through Redis is confirmed at once.
                with contextlib.suppress(StoreError):
                    await replicas.report(
                        self.store.pool,
                        self.replica,
                        {name: row.version for name, row in rows.items()},
                        self.report_lease,
                    )
            return True

    async def _poll(self) -> None:
        # Polls start every poll_interval (not poll_interval after the last one ended), so a
        # flip Redis did not announce is read at most poll_interval + one read after it.
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self._stopping:
            due = max(due + self.poll_interval, loop.time())
            await asyncio.sleep(due - loop.time())
            try:
                await self.reload()
            except Exception as exc:  # never let one bad answer stop propagation for good
                log.error("stage poll failed: %s", type(exc).__name__)
                self.postgres.mark(False, type(exc).__name__)

    async def _hear(self, pubsub: Any) -> None:
        """Reload on every announcement; PING Redis after ``PING_AFTER`` seconds of silence,
        and raise :class:`RedisSilent` if nothing comes back within ``ANSWER_WITHIN``."""
        loop = asyncio.get_running_loop()
        heard, asked = loop.time(), None
        while not self._stopping:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            now = loop.time()
            if message is not None:
                heard, asked = now, None  # any answer (a PONG included) says it is there
                if message.get("type") == "message":
                    await self.reload()
            elif asked is None:
                if now - heard >= PING_AFTER:
                    await pubsub.ping()
                    asked = now
            elif now - asked > ANSWER_WITHIN:
                raise RedisSilent(f"Redis did not answer a PING within {ANSWER_WITHIN:g} s")

    async def _listen(self) -> None:
        backoff = 0.1
        while not self._stopping:
            client = aioredis.Redis.from_url(
                self.redis_url,
                socket_connect_timeout=1.0,
                socket_keepalive=True,
                socket_timeout=REDIS_TIMEOUT,
            )
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(channel(self.prefix))
                    # Healthy once Redis has confirmed the subscription, not once it was sent.
                    await _answered(pubsub, "subscribe")
                    self.redis.mark(True)
                    backoff = 0.1
                    # Anything announced while we were not listening is in Postgres.
                    await self.reload()
                    await self._hear(pubsub)
            except Exception as exc:  # Redis away, or anything else: log, back off, listen again
                if not isinstance(exc, (RedisError, OSError)):
                    log.error("stage listener failed: %s", type(exc).__name__)
                reason = str(exc) if isinstance(exc, RedisSilent) else type(exc).__name__
                if self.redis.ok or self.redis.since == 0.0:
                    log.warning(
                        "Redis unreachable (%s); relying on polls every %.1fs",
                        reason,
                        self.poll_interval,
                    )
                self.redis.mark(False, reason)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
