"""The one place background tasks are started: named, and referenced until they finish.

A bare ``asyncio.create_task`` result may be garbage-collected mid-flight and its exception lost;
ruff's TID251 bans it everywhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_log = logging.getLogger("bascule.tasks")
_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Start ``coro`` as a named task, keep it referenced, and log its exception if it fails."""
    task = asyncio.create_task(coro, name=name)  # noqa: TID251 - the one allowed call
    _running.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if not task.cancelled() and task.exception() is not None:
        _log.error("task %s failed", task.get_name(), exc_info=task.exception())
