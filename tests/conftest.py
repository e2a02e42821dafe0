"""Test stores: the machine's Postgres and Redis when they answer, embedded ones otherwise.

Every test that needs state gets its own Postgres database and its own Redis key prefix, so
tests run in any order and never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import asyncpg
import pytest
import redis.asyncio as aioredis
from _pytest.nodeid import NodeId

from bascule.state.servers import StoreEndpoints, create_database, provide_stores
from refapi.lab import PROXY_ENV, migrate_state
from tests.dropping import Dropper

# A test fails when a background task dies or the event loop reports an exception.
pytest_plugins = ["tests.surfacing"]

_stack = ExitStack()
_endpoints: StoreEndpoints | None = None
_dropper: Dropper | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _endpoints, _dropper
    _endpoints = _stack.enter_context(provide_stores())
    _dropper = Dropper(_endpoints.postgres_url)
    # Proxies started in-process read their service credential from the environment.
    os.environ.update(PROXY_ENV)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put each ``xdist_group`` on one worker (``--dist loadgroup``) again: pytest-xdist 3.8
    names a test's group by appending ``@group`` to ``item._nodeid``, which pytest 9 no longer
    reads (a node's id is ``item._id``), so the groups were ignored and two proxy fleets ran
    at once, past the server's 100 connections (a 200-writer test then got 503s from a
    reference API refused its sessions)."""
    if not config.getoption("loadgroup", False):
        return
    for item in items:
        groups = {
            str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
            for mark in item.iter_markers("xdist_group")
        }
        if groups and "@" not in item.nodeid:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(sorted(groups))}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Every database the tests made is dropped before the run ends; one that could not be is
    a failure of the run (it would be left on the machine's server)."""
    assert _dropper is not None
    _dropper.close()
    if _dropper.failures:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            for failure in _dropper.failures:
                reporter.write_line(f"bascule tests: a test database was not dropped: {failure}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    _stack.close()


def pytest_report_header(config: pytest.Config) -> str:
    assert _endpoints is not None
    return f"bascule test stores: {_endpoints.describe()}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    assert _endpoints is not None
    terminalreporter.write_line(f"bascule test stores: {_endpoints.describe()}")


@pytest.fixture(scope="session")
def stores() -> StoreEndpoints:
    assert _endpoints is not None
    return _endpoints


MakeDatabase = Callable[[str], Awaitable[str]]


@pytest.fixture
async def make_database(stores: StoreEndpoints) -> AsyncIterator[MakeDatabase]:
    """A factory of fresh databases, each dropped after the test: ``await make_database("src")``."""
    made: list[str] = []
    tag = uuid.uuid4().hex[:10]

    async def make(label: str) -> str:
        name = f"bt_{tag}_{label}"
        made.append(name)
        return await create_database(stores.postgres_url, name)

    yield make
    assert _dropper is not None
    for name in made:
        _dropper.drop(name)  # off the test's path: tests/dropping.py


@pytest.fixture
async def pg_url(make_database: MakeDatabase) -> str:
    """One fresh database for the test."""
    return await make_database("db")


@pytest.fixture
async def state_pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the test's database, migrated as a state database."""
    from bascule.state.postgres import open_pool

    await migrate_state(pg_url)
    pool = await open_pool(pg_url)
    yield pool
    await pool.close()


@pytest.fixture
def redis_prefix() -> str:
    return f"bt:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def redis_url(stores: StoreEndpoints, redis_prefix: str) -> AsyncIterator[str]:
    """The Redis URL; keys under the test's ``redis_prefix`` are deleted afterwards."""
    yield stores.redis_url
    client = aioredis.Redis.from_url(stores.redis_url)
    try:
        async for key in client.scan_iter(match=redis_prefix + "*"):
            await client.delete(key)
    finally:
        await client.aclose()


class Ground(NamedTuple):
    """What a test world is built on: the test's folder, its database factory and store URLs.
    Unpacked into a world builder: ``build(*ground, ...)``."""

    tmp_path: Path
    make_database: MakeDatabase
    pg_url: str
    redis_url: str
    redis_prefix: str


@pytest.fixture
def ground(
    tmp_path: Path, make_database: MakeDatabase, pg_url: str, redis_url: str, redis_prefix: str
) -> Ground:
    return Ground(tmp_path, make_database, pg_url, redis_url, redis_prefix)
