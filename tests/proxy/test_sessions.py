"""The connection budget: a replica's state-Postgres sessions are bounded, named after it and
shown by ``bascule status``; a replica that cannot get one refuses a write at once
(``journal_unavailable``) instead of holding the researcher."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from contextlib import AsyncExitStack

import aiohttp
import asyncpg
from yarl import URL

from bascule.app.replica import Replica
from bascule.config import Secrets, StateSettings
from bascule.stages import Stage
from refapi.lab import AUTH, PROXY_ENV
from tests.conftest import Ground
from tests.harness import dcir_record, serve_proxy
from tests.world import build_world

WITHIN = 20.0
"""The test's bound on a refusal: coarse (``session_wait`` is set to 1 s here)."""


def test_the_default_budget_lets_ten_replicas_share_a_default_postgres() -> None:
    """docs/operations.md's arithmetic: ten replicas at the defaults, the CLI (4) and the
    server's reserved superuser sessions (3) under a default ``max_connections`` (100)."""
    state = StateSettings()
    per_replica = state.sessions + state.journal_sessions + state.shadow_sessions
    assert 10 * per_replica + 4 + 3 <= 100, per_replica


async def _execute(database: str, statements: str) -> None:
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(statements)
    finally:
        await conn.close()


async def _write(proxy: str, rid: int) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession(headers=AUTH) as session,
        asyncio.timeout(WITHIN),
        session.put(
            f"{proxy}/v1/datasets/dcir/records/{rid}", json={"id": rid, **dcir_record(rid, 3)}
        ) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_replica_without_a_free_session_refuses_writes_at_once(ground: Ground) -> None:
    """Its journal sessions all held (writes stuck elsewhere): a write is refused 503
    ``journal_unavailable`` before reaching any backend, rather than waiting for one; once
    one is free, writes go through. Then a replica whose role has reached its ``CONNECTION
    LIMIT``: the same. ``bascule status`` shows each replica's sessions."""
    async with build_world(ground, stages=(Stage.DUALWRITE,)) as world:
        replica = world.replica
        assert replica.dual is not None
        replica.dual.journal.session_wait = 1.0  # the product's is 10 s: the test's, shorter
        held = [await replica.journal_pool.acquire() for _ in range(6)]  # lab: 6 sessions
        try:
            status, body = await _write(world.proxy, 3)
        finally:
            for conn in held:
                await replica.journal_pool.release(conn)
        assert status == 503, body
        error = body["error"]
        assert isinstance(error, dict) and error["code"] == "journal_unavailable", body
        assert "no journal session within 1 s" in str(error["message"]), body
        assert (await _write(world.proxy, 3))[0] == 200

        # A replica whose role may hold two sessions, both taken: refused at once too.
        role = f"capped_{secrets.token_hex(4)}"
        url = URL(world.state_db)
        database = url.path.lstrip("/")
        await _execute(
            world.state_db,
            f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 2;"
            f" GRANT ALL ON DATABASE {database} TO {role};"
            f" GRANT USAGE ON SCHEMA public TO {role};"
            f" GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};"
            f" GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};"
            f" GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role}",
        )
        capped_url = str(url.with_user(role))
        try:
            async with AsyncExitStack() as stack:
                own = Secrets.from_env({**os.environ, **PROXY_ENV})
                capped = await stack.enter_async_context(
                    Replica(world.config, own, capped_url, world.redis_url, name="capped")
                )
                proxy = await stack.enter_async_context(serve_proxy(capped.server()))
                await capped.view.reload()
                # Whatever it holds now, the test takes what the role has left.
                taken = []
                while True:
                    try:
                        taken.append(await asyncpg.connect(capped_url))
                    except asyncpg.TooManyConnectionsError:
                        break
                    assert len(taken) <= 2, "the role's CONNECTION LIMIT is not enforced"
                try:
                    status, body = await _write(proxy, 4)
                finally:
                    for session in taken:
                        await session.close()
                assert status == 503, body
                error = body["error"]
                assert isinstance(error, dict) and error["code"] == "journal_unavailable", body

                fleet = world.cli("status", "--json")
                assert fleet.returncode == 0, fleet.stderr
                sessions = {r["name"]: r["sessions"] for r in json.loads(fleet.stdout)["replicas"]}
                assert sessions["replica-0"] >= 1, sessions
                assert sessions["replica-0"] <= 3 + 6 + 2, sessions  # sessions + journal + shadow
                table = world.cli("status")
                assert "state sessions" in table.stdout, table.stdout
        finally:
            await world.sql(
                world.state_db,
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'",
            )
            await _execute(
                world.state_db,
                f"REVOKE ALL ON DATABASE {database} FROM {role}; DROP OWNED BY {role}",
            )
            await _execute(world.state_db, f"DROP ROLE {role}")
