"""Noise decisions announced on Redis: a nudge to every replica to reload the accepted rules.

Postgres holds the rules and their version (:mod:`shadow.noise_store`); a message lost, or
Redis away, only delays a reload until the replica's next poll of that version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("bascule.noise")

CHANNEL = "noise"


def channel(prefix: str) -> str:
    return f"{prefix}{CHANNEL}"


async def listen(
    redis: aioredis.Redis,
    prefix: str,
    on_change: Callable[[str | None], Awaitable[None]],
    stopping: asyncio.Event | None = None,
) -> None:
    """Call ``on_change(dataset)`` for each decision announced on Redis, and
    ``on_change(None)`` on every (re)subscription (what was announced meanwhile is in
    Postgres). Runs until ``stopping`` is set (or cancelled: redis-py can swallow a
    cancellation inside its read timeout, redis/redis-py#2028, so set it first); Redis away
    is retried with a backoff, and the caller polls :meth:`version` meanwhile."""
    stopping = stopping or asyncio.Event()
    backoff = 0.1
    while not stopping.is_set():
        try:
            async with redis.pubsub() as pubsub:
                await pubsub.subscribe(channel(prefix))
                backoff = 0.1
                await on_change(None)
                while not stopping.is_set():
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if message is not None and message.get("type") == "message":
                        await on_change(_announced_dataset(message.get("data")))
        except (RedisError, OSError) as exc:
            log.info("noise decisions not heard on Redis (%s); polling", type(exc).__name__)
        if not stopping.is_set():
            await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 2.0)


async def announce(redis: aioredis.Redis, prefix: str, dataset: str, version: int) -> bool:
    """Tell every replica that ``dataset``'s rules changed; False when Redis is away."""
    message = orjson.dumps({"dataset": dataset, "version": version})
    try:
        await redis.publish(channel(prefix), message)
        return True
    except (RedisError, OSError) as exc:
        log.warning(
            "could not announce noise rules of %s on Redis (%s); replicas will poll",
            dataset,
            type(exc).__name__,
        )
        return False


def _announced_dataset(data: Any) -> str | None:
    with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
        name = orjson.loads(data).get("dataset")
        return name if isinstance(name, str) else None
    return None
