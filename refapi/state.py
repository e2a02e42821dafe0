"""What an app instance knows, under typed keys: its settings and its database pool."""

from __future__ import annotations

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
