"""Fixtures for the reference API: an app on a fresh database, a client with a researcher token."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeAlias

import asyncpg
import orjson
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp.plugin import AiohttpClient

from refapi.app import create_app
from refapi.seed import seed_database

RESEARCHER = "researcher-token-7f3a"
SERVICE = "service-token-9c1e"
AUTH = {"Authorization": f"Bearer {RESEARCHER}"}
SEEDED_ROWS = 40

Client: TypeAlias = TestClient[web.Request, web.Application]
MakeClient: TypeAlias = Callable[..., Awaitable[Client]]


async def body(resp: ClientResponse) -> Any:
    """The decoded JSON body (``orjson``, as the server encodes it)."""
    return orjson.loads(await resp.read())


async def error_of(resp: ClientResponse, status: int) -> Mapping[str, str]:
    """Assert an error answer: its status, and the ``{"error": {code, message}}`` shape."""
    payload = await body(resp)
    assert resp.status == status, payload
    assert resp.content_type == "application/json"
    assert set(payload) == {"error", "served_at"}
    assert set(payload["error"]) == {"code", "message"}
    error: Mapping[str, str] = payload["error"]
    return error


def dcir_record(**changes: object) -> dict[str, object]:
    record: dict[str, object] = {
        "patient_id": "P00112233445566ff",
        "act_code": "G",
        "act_date": "2024-03-14",
        "amount": 26.5,
        "prescriber_speciality": "01",
        "department": "75",
    }
    record.update(changes)
    return record


def pmsi_record(**changes: object) -> dict[str, object]:
    record: dict[str, object] = {
        "patient_id": "P00112233445566ff",
        "ghm": "05M092",
        "admission_date": "2024-02-01",
        "discharge_date": "2024-02-09",
        "finess": "750100125",
        "exit_mode": "8",
        "tariff": 4210.0,
        "department": "75",
    }
    record.update(changes)
    return record


@pytest.fixture
async def make_client(pg_url: str, aiohttp_client: AiohttpClient) -> MakeClient:
    """``await make_client(honour_idempotency=False, headers={})``: an app on ``pg_url``."""
    # pg_url first: fixtures tear down in reverse, so apps close their pools before the
    # database is dropped under them.

    async def make(
        *,
        honour_idempotency: bool = True,
        headers: Mapping[str, str] = AUTH,
        name: str = "t-api",
        database_url: str | None = None,
    ) -> Client:
        app = create_app(
            name,
            database_url or pg_url,
            [RESEARCHER, SERVICE],
            honour_idempotency=honour_idempotency,
        )
        return await aiohttp_client(app, headers=dict(headers))

    return make


@pytest.fixture
async def api(make_client: MakeClient) -> Client:
    """A client carrying the researcher's token, on an empty database."""
    return await make_client()


@pytest.fixture
async def seeded(pg_url: str, make_client: MakeClient) -> Client:
    """A client on a database seeded with ``SEEDED_ROWS`` rows per dataset (seed 1)."""
    await seed_database(pg_url, SEEDED_ROWS, seed=1)
    return await make_client()


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A direct connection to the test's database, to check what the API stored."""
    conn = await asyncpg.connect(pg_url)
    yield conn
    await conn.close()
