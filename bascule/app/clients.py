"""How the CLI reaches the operator commands: on the stores (:class:`Operations` itself), or
through a proxy's admin API (:class:`AdminClient`, the same methods over HTTP).

Both run the same checks and write the same audit: the admin API calls :class:`Operations` on
the replica's side. ``--admin URL`` picks the admin API (token from ``BASCULE_ADMIN_TOKEN`` or
``BASCULE_VIEWER_TOKEN``); otherwise the stores named by the configuration.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson
import redis.asyncio as aioredis

from bascule.app.operations import Operations, naming_of
from bascule.config import Config, Secrets, load_config
from bascule.errors import ConfigError, Refused, StoreError, UsageError
from bascule.state.fleet import REDIS_TIMEOUT, RedisAnnouncer
from bascule.state.postgres import IDLE_IN_TRANSACTION, open_pool, schema_check
from bascule.state.servers import provide_stores
from bascule.state.stage_store import StageStore
from cutover.controller import groups_of
from cutover.gate import gates_of
from cutover.switch import switcher_for
from shadow.noise_store import NoiseStore, noise_pairs


def config_of(args: argparse.Namespace) -> Config:
    if args.config is None:
        raise UsageError("no configuration: pass --config FILE or set BASCULE_CONFIG")
    return load_config(args.config)


@asynccontextmanager
async def client_for(args: argparse.Namespace, *, change: bool) -> AsyncIterator[Client]:
    if args.admin:
        env_name = "BASCULE_ADMIN_TOKEN" if change else "BASCULE_VIEWER_TOKEN"
        token = os.environ.get(env_name) or os.environ.get("BASCULE_ADMIN_TOKEN")
        if not token:
            raise UsageError(f"--admin needs a token: set {env_name}")
        headers = {"Authorization": f"Bearer {token}"}
        # An authority switch may wait for its backlog, its barrier and its replicas.
        timeout = aiohttp.ClientTimeout(total=300)
        # An https admin port whose certificate a private CA signed: BASCULE_ADMIN_CA names
        # that CA's PEM file (the system's CAs otherwise).
        connector = None
        if os.environ.get("BASCULE_ADMIN_CA"):
            try:
                trusted = ssl.create_default_context(cafile=os.environ["BASCULE_ADMIN_CA"])
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"BASCULE_ADMIN_CA: cannot use it as a CA bundle: {exc}") from None
            connector = aiohttp.TCPConnector(ssl=trusted)
        async with aiohttp.ClientSession(
            headers=headers, timeout=timeout, connector=connector
        ) as session:
            yield AdminClient(session, args.admin)
        return
    config = config_of(args)
    with provide_stores(config.state.postgres_url, config.state.redis_url, embed=False) as found:
        # Up to 3 at once: the write fence held during a change, its commit, and the backlog
        # and replica queries of an authority switch.
        pool = await open_pool(
            found.postgres_url,
            max_size=4,
            application_name="bascule cli",
            dead_session_after=config.state.dead_session_after,
            idle_in_transaction=IDLE_IN_TRANSACTION,
        )
        # A Redis behind a silent partition must not hang the announcement of a change.
        redis = aioredis.Redis.from_url(
            found.redis_url, socket_connect_timeout=1.0, socket_timeout=REDIS_TIMEOUT
        )
        try:
            await schema_check(pool)
            yield Operations(
                StageStore(pool),
                RedisAnnouncer(redis, config.state.redis_prefix),
                switcher_for(config, pool),
                NoiseStore(pool, redis, config.state.redis_prefix),
                noise_pairs(config),
                gates_of(config, pool),
                groups_of(config),
                naming_of(config, _secrets()),
            )
        finally:
            await redis.aclose()
            await pool.close()


def _secrets() -> Secrets:
    """The journal's keys, when this environment has them (only `journal resolve` needs them,
    and says so when they are missing)."""
    try:
        return Secrets.from_env(os.environ)
    except ConfigError:
        return Secrets()


class AdminClient:
    """Works through a proxy's admin API."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base.rstrip("/")

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        refused_with: str | None = None,
    ) -> Any:
        """The answer's JSON. ``refused_with``: on a 409 whose body carries that key (a dry
        run's findings), return it rather than raising :class:`Refused`."""
        try:
            async with self.session.request(
                method,
                self.base + path,
                data=orjson.dumps(body) if body is not None else None,
                headers={"Content-Type": "application/json"},
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise StoreError(
                f"the admin API at {self.base} did not answer ({type(exc).__name__})"
            ) from exc
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise StoreError(f"the admin API answered {status} with a non-JSON body") from None
        if status < 400:
            return payload
        message = payload.get("error", {}).get("message", raw.decode(errors="replace"))
        if status == 409 and refused_with is not None and refused_with in payload:
            return payload[refused_with]
        if status in (404, 409):
            raise Refused(message)
        if status in (400, 401, 403):
            raise UsageError(f"admin API: {message}")
        raise StoreError(f"admin API: {message}")

    async def datasets(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self._call("GET", "/v1/datasets"))["datasets"]
        return result

    async def replicas(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self._call("GET", "/v1/replicas"))["replicas"]
        return result

    async def divergence(self, dataset: str, since: float) -> dict[str, Any]:
        # Encoded: `1e+06` sent raw reads as `1e 06` (a `+` in a query string is a space).
        path = f"/v1/datasets/{quote(dataset, safe='')}/divergence?" + urlencode({"since": since})
        result: dict[str, Any] = await self._call("GET", path)
        return result

    async def auto_promote(
        self, dataset: str, on: bool, by: str, reason: str | None
    ) -> dict[str, Any]:
        path = f"/v1/datasets/{quote(dataset, safe='')}/auto-promote"
        body = {"on": on, "by": by, "reason": reason}
        result: dict[str, Any] = await self._call("POST", path, body)
        return result

    async def gate_report(self, dataset: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "GET", f"/v1/datasets/{quote(dataset, safe='')}/gate"
        )
        return result

    async def noise(self, dataset: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "GET", f"/v1/datasets/{quote(dataset, safe='')}/noise"
        )
        return result

    async def noise_decide(
        self,
        dataset: str,
        pointer: str,
        accept: bool,
        by: str,
        reason: str | None,
        route: str | None,
    ) -> dict[str, Any]:
        body = {
            "pointer": pointer,
            "decision": "accept" if accept else "reject",
            "reason": reason,
            "by": by,
            **({"route": route} if route is not None else {}),
        }
        path = f"/v1/datasets/{quote(dataset, safe='')}/noise"
        result: dict[str, Any] = await self._call("POST", path, body)
        return result

    async def history(self, dataset: str | None, limit: int) -> list[dict[str, Any]]:
        query = urlencode({"limit": limit, **({"dataset": dataset} if dataset else {})})
        result: list[dict[str, Any]] = (await self._call("GET", "/v1/history?" + query))["history"]
        return result

    async def stage(
        self, dataset: str, stage: str, by: str, reason: str | None, *, force: bool, dry_run: bool
    ) -> dict[str, Any]:
        return await self._move(dataset, "stage", {"stage": stage}, by, reason, force, dry_run)

    async def rollback(
        self,
        dataset: str,
        to: str | None,
        by: str,
        reason: str | None,
        *,
        force: bool,
        dry_run: bool,
    ) -> dict[str, Any]:
        return await self._move(dataset, "rollback", {"to": to}, by, reason, force, dry_run)

    async def _move(
        self,
        dataset: str,
        action: str,
        body: dict[str, Any],
        by: str,
        reason: str | None,
        force: bool,
        dry_run: bool,
    ) -> dict[str, Any]:
        """A stage change or a rollback: a dry run's refusal comes back as its findings."""
        body = {**body, "by": by, "reason": reason, "force": force, "dry_run": dry_run}
        path = f"/v1/datasets/{quote(dataset, safe='')}/{action}"
        result: dict[str, Any] = await self._call("POST", path, body, refused_with="dry_run")
        return result

    async def gap_close(
        self, dataset: str, side: str, by: str, reason: str | None
    ) -> dict[str, Any]:
        path = f"/v1/datasets/{quote(dataset, safe='')}/gaps/{quote(side, safe='')}/close"
        result: dict[str, Any] = await self._call("POST", path, {"by": by, "reason": reason})
        return result

    async def journal_status(self) -> dict[str, dict[str, Any]]:
        rows = (await self._call("GET", "/v1/journal"))["journal"]
        return {r.pop("dataset"): r for r in rows}

    async def journal_list(
        self, state: str, dataset: str | None, limit: int
    ) -> list[dict[str, Any]]:
        query = urlencode(
            {"state": state, "limit": limit, **({"dataset": dataset} if dataset else {})}
        )
        result: list[dict[str, Any]] = (await self._call("GET", "/v1/journal/entries?" + query))[
            "entries"
        ]
        return result

    async def journal_retry(
        self, seq: int | None, all_dead: bool, by: str = "operator", reason: str | None = None
    ) -> int:
        body = {"seq": seq, "all_dead": all_dead, "by": by, "reason": reason}
        count: int = (await self._call("POST", "/v1/journal/retry", body))["retried"]
        return count

    async def journal_resolve(
        self, seq: int, outcome: str, record: str | None, by: str, reason: str | None
    ) -> dict[str, Any]:
        body = {"as": outcome, "record": record, "by": by, "reason": reason}
        result: dict[str, Any] = await self._call("POST", f"/v1/journal/{seq}/resolve", body)
        return result

    async def journal_skip(self, seq: int, by: str, reason: str | None) -> str:
        body = {"by": by, "reason": reason}
        path = f"/v1/journal/{quote(str(seq), safe='')}/skip"
        dataset: str = (await self._call("POST", path, body))["dataset"]
        return dataset


Client = Operations | AdminClient
"""What the CLI calls: :class:`Operations` on the stores, or the same methods over HTTP."""
