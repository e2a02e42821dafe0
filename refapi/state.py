"""What an app instance knows, under typed keys: its settings and its database pool."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web

from refapi.auth import TokenSet


@dataclass(frozen=True)
class Settings:
    name: str
    database_url: str
    tokens: TokenSet
    honour_idempotency: bool = True
    pool_size: int = 10


SETTINGS = web.AppKey("refapi_settings", Settings)
POOL: web.AppKey[asyncpg.Pool[Any]] = web.AppKey("refapi_pool")


@dataclass(frozen=True)
class Received:
    """The trace context a request came with (what bascule propagates), and little else: the
    method, the route template (never the path) and whether it was a shadow read."""

    method: str
    route: str
    traceparent: str | None
    shadow: bool


RECEIVED_KEPT = 10_000
RECEIVED: web.AppKey[deque[Received]] = web.AppKey("refapi_received")
"""The last :data:`RECEIVED_KEPT` requests' trace contexts, oldest first (tests read them)."""
