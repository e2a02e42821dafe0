"""SRE commands: migrate, status, stage, rollback, gap close, history, journal, divergence, noise.

Each works either directly on the state stores named by the configuration, or through a
proxy's admin API (``--admin URL``, token from ``BASCULE_ADMIN_TOKEN``/``BASCULE_VIEWER_TOKEN``);
both paths run the same checks and write the same audit. Human output is a table; ``--json``
is stable for scripts. Exit codes: 0 done, 1 error, 2 bad usage, 3 refused (nothing changed).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import orjson
import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bascule import checks
from bascule.config import Config, load_config
from bascule.errors import Refused, StoreError, UsageError
from bascule.stages import Side, Stage
from bascule.state import replicas, schema
from bascule.state.fleet import RedisAnnouncer
from bascule.state.journal import queries
from bascule.state.journal.entries import IllegalTransition
from bascule.state.postgres import open_pool, reaching_postgres, schema_check
from bascule.state.servers import provide_stores
from bascule.state.stage_store import StageStore
from cutover import controller
from cutover.switch import Switcher, switcher_for
from shadow import ledger
from shadow.noise_store import NoiseStore, noise_pairs, pairs_needed


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("BASCULE_CONFIG"),
        help="TOML configuration (default: $BASCULE_CONFIG)",
    )
    common.add_argument(
        "--admin",
        default=os.environ.get("BASCULE_ADMIN_URL"),
        help="go through this proxy admin API instead of the stores (default: $BASCULE_ADMIN_URL)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "migrate",
        parents=[common],
        help="create or upgrade bascule's state schema and register datasets",
    )
    p.set_defaults(func=lambda a: _run(_migrate(a)))

    p = sub.add_parser("status", parents=[common], help="each dataset's stage")
    p.add_argument("dataset", nargs="?")
    p.set_defaults(func=lambda a: _run(_status(a)))

    moving = argparse.ArgumentParser(add_help=False)
    moving.add_argument("--reason", help="why (required; goes into the audit trail)")
    moving.add_argument("--by", default=_os_user(), help="who (default: the OS user)")
    moving.add_argument(
        "--force",
        action="store_true",
        help="override the gap rule (a side that missed writes would serve, be authoritative "
        "or be compared); audited as forced",
    )
    moving.add_argument(
        "--dry-run",
        action="store_true",
        help="show the checks and the steps a real move would take; change nothing "
        "(exit 0 if it would be allowed, 3 if refused)",
    )

    p = sub.add_parser("stage", parents=[common, moving], help="move a dataset to a stage")
    p.add_argument("dataset")
    p.add_argument("stage")
    p.set_defaults(func=lambda a: _run(_stage(a)))

    p = sub.add_parser("rollback", parents=[common, moving], help="move a dataset back")
    p.add_argument("dataset")
    p.add_argument("--to", help="stage to go back to (default: the previous one)")
    p.set_defaults(func=lambda a: _run(_rollback(a)))

    gp = sub.add_parser("gap", help="gap markers: a side that missed writes")
    gsub = gp.add_subparsers(dest="gap_command", metavar="ACTION")
    gsub.required = True
    p = gsub.add_parser(
        "close",
        parents=[common],
        help="close a side's gap once it is verified complete (audited)",
    )
    p.add_argument("dataset")
    p.add_argument("side", choices=[s.value for s in Side])
    p.add_argument("--reason", help="why (required; goes into the audit trail)")
    p.add_argument("--by", default=_os_user(), help="who (default: the OS user)")
    p.set_defaults(func=lambda a: _run(_gap_close(a)))

    jp = sub.add_parser("journal", help="the dual-write journal: backlog, entries, retry, skip")
    jsub = jp.add_subparsers(dest="journal_command", metavar="ACTION")
    jsub.required = True
    p = jsub.add_parser("status", parents=[common], help="backlog per dataset")
    p.add_argument("dataset", nargs="?")
    p.set_defaults(func=lambda a: _run(_journal_status(a)))
    p = jsub.add_parser("list", parents=[common], help="entries in a state (never their bodies)")
    p.add_argument("--state", required=True, choices=["pending", "dead", "in-doubt", "intent"])
    p.add_argument("--dataset")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=lambda a: _run(_journal_list(a)))
    p = jsub.add_parser("retry", parents=[common], help="send dead entries back to the replayer")
    p.add_argument("seq", nargs="?", type=int)
    p.add_argument("--all-dead", action="store_true")
    p.set_defaults(func=lambda a: _run(_journal_retry(a)))
    p = jsub.add_parser("skip", parents=[common], help="give up replaying an entry (audited)")
    p.add_argument("seq", type=int)
    p.add_argument("--reason", help="why (required; goes into the audit trail)")
    p.add_argument("--by", default=_os_user(), help="who (default: the OS user)")
    p.set_defaults(func=lambda a: _run(_journal_skip(a)))

    p = sub.add_parser(
        "divergence", parents=[common], help="recent mismatches grouped by where they differ"
    )
    p.add_argument("dataset")
    p.add_argument(
        "--since", type=float, default=24 * 3600.0, help="seconds back (default: one day)"
    )
    p.set_defaults(func=lambda a: _run(_divergence(a)))

    p = sub.add_parser(
        "noise",
        parents=[common],
        help="noise proposals: pointers that differ between two answers of one side; "
        "list them, accept or reject one (audited)",
    )
    p.add_argument("dataset")
    p.add_argument("action", nargs="?", choices=["accept", "reject"])
    p.add_argument("pointer", nargs="?", help="the proposal's pattern, e.g. /records/*/served_at")
    p.add_argument(
        "--route", help="only this route template (default: every route it was proposed on)"
    )
    p.add_argument("--reason", help="why (required to decide; goes into the audit trail)")
    p.add_argument("--by", default=_os_user(), help="who (default: the OS user)")
    p.set_defaults(func=lambda a: _run(_noise(a)))

    p = sub.add_parser("history", parents=[common], help="the audit trail of stage changes")
    p.add_argument("dataset", nargs="?")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=lambda a: _run(_history(a)))


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _run(coro: Any) -> int:
    result: int = asyncio.run(coro)
    return result


class Client(Protocol):
    async def datasets(self) -> list[dict[str, Any]]: ...
    async def history(self, dataset: str | None, limit: int) -> list[dict[str, Any]]: ...
    async def stage(
        self, dataset: str, stage: str, by: str, reason: str | None, *, force: bool, dry_run: bool
    ) -> dict[str, Any]: ...
    async def rollback(
        self,
        dataset: str,
        to: str | None,
        by: str,
        reason: str | None,
        *,
        force: bool,
        dry_run: bool,
    ) -> dict[str, Any]: ...
    async def gap_close(self, dataset: str, side: str, by: str, reason: str) -> dict[str, Any]: ...
    async def journal_status(self) -> dict[str, dict[str, Any]]: ...
    async def journal_list(
        self, state: str, dataset: str | None, limit: int
    ) -> list[dict[str, Any]]: ...
    async def journal_retry(self, seq: int | None, all_dead: bool) -> int: ...
    async def journal_skip(self, seq: int, by: str, reason: str) -> str: ...
    async def replicas(self) -> list[dict[str, Any]]: ...
    async def divergence(self, dataset: str, since: float) -> dict[str, Any]: ...
    async def noise(self, dataset: str) -> dict[str, Any]: ...
    async def noise_decide(
        self,
        dataset: str,
        pointer: str,
        accept: bool,
        by: str,
        reason: str,
        route: str | None,
    ) -> dict[str, Any]: ...


def _config(args: argparse.Namespace) -> Config:
    if args.config is None:
        raise UsageError("no configuration: pass --config FILE or set BASCULE_CONFIG")
    return load_config(args.config)


class DirectClient:
    """Works on the stores themselves."""

    def __init__(
        self,
        store: StageStore,
        announcer: RedisAnnouncer,
        switcher: Switcher,
        noise: NoiseStore | None = None,
        pairs: Mapping[str, int] | None = None,
    ) -> None:
        self.store = store
        self.announcer = announcer
        self.switcher = switcher
        self.noise_store = noise
        self.pairs = dict(pairs or {})
        """Each configured dataset's ``noise_pairs``."""

    def _noise_store(self) -> NoiseStore:
        if self.noise_store is None:
            raise UsageError("noise proposals need the configured stores")
        return self.noise_store

    async def noise(self, dataset: str) -> dict[str, Any]:
        min_pairs = pairs_needed(self.pairs, dataset)
        rows = await self._noise_store().proposals(dataset, min_pairs)
        return {"dataset": dataset, "min_pairs": min_pairs, "proposals": rows}

    async def noise_decide(
        self,
        dataset: str,
        pointer: str,
        accept: bool,
        by: str,
        reason: str,
        route: str | None,
    ) -> dict[str, Any]:
        min_pairs = pairs_needed(self.pairs, dataset)
        return await self._noise_store().decide(
            dataset, pointer, accept, reason, by, route, min_pairs=min_pairs
        )

    async def datasets(self) -> list[dict[str, Any]]:
        rows = await self.store.all()
        counts = await queries.backlog(self.store.pool)
        return [{**rows[n].as_json(), **counts.get(n, queries.EMPTY_BACKLOG)} for n in sorted(rows)]

    async def history(self, dataset: str | None, limit: int) -> list[dict[str, Any]]:
        return [r.as_json() for r in await self.store.history(dataset, limit)]

    async def replicas(self) -> list[dict[str, Any]]:
        return [r.as_json() for r in await replicas.listing(self.store.pool)]

    async def divergence(self, dataset: str, since: float) -> dict[str, Any]:
        await self.store.get(checks.check_name(dataset))  # UnknownDataset names the known ones
        start = datetime.now(UTC) - timedelta(seconds=since)
        return {
            "divergence": await ledger.divergence(self.store.pool, dataset, start),
            "errored": await ledger.errored(self.store.pool, dataset, start),
        }

    async def stage(
        self, dataset: str, stage: str, by: str, reason: str | None, *, force: bool, dry_run: bool
    ) -> dict[str, Any]:
        result = await controller.move(
            self.store,
            self.announcer,
            dataset,
            Stage.parse(stage),
            actor=by,
            reason=reason,
            force=force,
            dry_run=dry_run,
            switcher=self.switcher,
        )
        return result.as_json()

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
        result = await controller.rollback(
            self.store,
            self.announcer,
            dataset,
            to=Stage.parse(to) if to else None,
            actor=by,
            reason=reason,
            force=force,
            dry_run=dry_run,
            switcher=self.switcher,
        )
        return result.as_json()

    async def gap_close(self, dataset: str, side: str, by: str, reason: str) -> dict[str, Any]:
        closed = await controller.close_gap(
            self.store, dataset, Side.parse(side), actor=by, reason=reason
        )
        return closed.as_json()

    async def journal_status(self) -> dict[str, dict[str, Any]]:
        counts = await queries.backlog(self.store.pool)
        return {n: counts.get(n, queries.EMPTY_BACKLOG) for n in await self.store.names()}

    async def journal_list(
        self, state: str, dataset: str | None, limit: int
    ) -> list[dict[str, Any]]:
        return await queries.listing(self.store.pool, state, dataset, limit)

    async def journal_retry(self, seq: int | None, all_dead: bool) -> int:
        return await queries.retry(self.store.pool, seq, all_dead=all_dead)

    async def journal_skip(self, seq: int, by: str, reason: str) -> str:
        try:
            return await queries.skip(self.store.pool, seq, actor=by, reason=reason)
        except IllegalTransition as exc:
            raise Refused(str(exc)) from None


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
        path = f"/v1/datasets/{quote(dataset, safe='')}/divergence?since={since:g}"
        result = await self._call("GET", path)
        return {"divergence": result["divergence"], "errored": result.get("errored", [])}

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
        reason: str,
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
        query = f"?limit={limit}" + (f"&dataset={quote(dataset, safe='')}" if dataset else "")
        result: list[dict[str, Any]] = (await self._call("GET", "/v1/history" + query))["history"]
        return result

    async def stage(
        self, dataset: str, stage: str, by: str, reason: str | None, *, force: bool, dry_run: bool
    ) -> dict[str, Any]:
        body = {"stage": stage, "by": by, "reason": reason, "force": force, "dry_run": dry_run}
        path = f"/v1/datasets/{quote(dataset, safe='')}/stage"
        result: dict[str, Any] = await self._call("POST", path, body, refused_with="dry_run")
        return result

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
        body = {"to": to, "by": by, "reason": reason, "force": force, "dry_run": dry_run}
        path = f"/v1/datasets/{quote(dataset, safe='')}/rollback"
        result: dict[str, Any] = await self._call("POST", path, body, refused_with="dry_run")
        return result

    async def gap_close(self, dataset: str, side: str, by: str, reason: str) -> dict[str, Any]:
        path = f"/v1/datasets/{quote(dataset, safe='')}/gaps/{quote(side, safe='')}/close"
        result: dict[str, Any] = await self._call("POST", path, {"by": by, "reason": reason})
        return result

    async def journal_status(self) -> dict[str, dict[str, Any]]:
        rows = (await self._call("GET", "/v1/journal"))["journal"]
        return {r.pop("dataset"): r for r in rows}

    async def journal_list(
        self, state: str, dataset: str | None, limit: int
    ) -> list[dict[str, Any]]:
        query = f"?state={quote(state, safe='')}&limit={limit}"
        if dataset:
            query += f"&dataset={quote(dataset, safe='')}"
        result: list[dict[str, Any]] = (await self._call("GET", "/v1/journal/entries" + query))[
            "entries"
        ]
        return result

    async def journal_retry(self, seq: int | None, all_dead: bool) -> int:
        body = {"seq": seq, "all_dead": all_dead}
        count: int = (await self._call("POST", "/v1/journal/retry", body))["retried"]
        return count

    async def journal_skip(self, seq: int, by: str, reason: str) -> str:
        body = {"by": by, "reason": reason}
        dataset: str = (await self._call("POST", f"/v1/journal/{seq}/skip", body))["dataset"]
        return dataset


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
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            yield AdminClient(session, args.admin)
        return
    config = _config(args)
    with provide_stores(config.state.postgres_url, config.state.redis_url, embed=False) as found:
        # Up to 3 at once: the write fence held during a change, its commit, and the backlog
        # and replica queries of an authority switch.
        pool = await open_pool(found.postgres_url, max_size=4)
        redis = aioredis.Redis.from_url(found.redis_url, socket_connect_timeout=1.0)
        try:
            await schema_check(pool)
            yield DirectClient(
                StageStore(pool),
                RedisAnnouncer(redis, config.state.redis_prefix),
                switcher_for(config, pool),
                NoiseStore(pool, redis, config.state.redis_prefix),
                noise_pairs(config),
            )
        finally:
            await redis.aclose()
            await pool.close()


async def _migrate(args: argparse.Namespace) -> int:
    config = _config(args)
    with provide_stores(config.state.postgres_url, config.state.redis_url, embed=False) as found:
        pool = await open_pool(found.postgres_url, max_size=1)
        try:
            async with reaching_postgres(), pool.acquire() as conn:
                applied = await schema.migrate(conn)
            added = await StageStore(pool).register(config.datasets, actor=_os_user())
        finally:
            await pool.close()
    names = [f"{m.version:04d}_{m.name}" for m in applied]
    out = {
        "applied": names,
        "registered": added,
        "schema_version": schema.LATEST,
    }
    if args.json:
        _print_json(out)
    else:
        print(f"schema at version {schema.LATEST}; applied: {', '.join(names) or 'none'}")
        print(f"datasets registered at 'source': {', '.join(added) or 'none new'}")
    return 0


async def _status(args: argparse.Namespace) -> int:
    async with client_for(args, change=False) as client:
        rows = await client.datasets()
        fleet = await client.replicas()
    if args.dataset:
        rows = [r for r in rows if r["dataset"] == args.dataset]
        if not rows:
            raise Refused(f"unknown dataset {args.dataset!r}")
    if args.json:
        _print_json({"datasets": rows, "replicas": fleet})
        return 0
    table = Table(title="datasets")
    for col in (
        "dataset",
        "stage",
        "version",
        "since",
        "by",
        "reason",
        "backlog",
        "oldest",
        "in doubt",
        "dead",
        "gaps",
    ):
        table.add_column(col)
    for r in rows:
        oldest = r.get("oldest_pending_seconds")
        gaps = r.get("gaps") or {}
        open_gaps = ", ".join(f"{side} since {_when(gaps[side])}" for side in gaps if gaps[side])
        cells = (
            r["dataset"],
            r["stage"],
            str(r["version"]),
            _when(r["updated_at"]),
            r["updated_by"],
            r["reason"],
            str(r.get("backlog", 0)),
            f"{oldest:.1f}s" if oldest is not None else "-",
            str(r.get("in_doubt", 0)),
            str(r.get("dead", 0)),
            open_gaps or "-",
        )
        table.add_row(*(Text(c) for c in cells))  # Text: audit free text is never markup
    _console().print(table)
    shown = [r["dataset"] for r in rows]
    replica_table = Table(title="replicas (the stage version each runs)")
    for col in ("replica", "alive", "last report", *shown):
        replica_table.add_column(col)
    current = {r["dataset"]: r["version"] for r in rows}
    for rep in fleet:
        versions = rep["versions"]
        cells = (
            rep["name"],
            "yes" if rep["alive"] else "lease expired",
            _when(rep["seen_at"]),
            *(
                f"{versions.get(d, '-')}" + ("" if versions.get(d) == current[d] else " (behind)")
                for d in shown
            ),
        )
        replica_table.add_row(*(Text(c) for c in cells))
    _console().print(replica_table)
    return 0


async def _stage(args: argparse.Namespace) -> int:
    async with client_for(args, change=True) as client:
        result = await client.stage(
            args.dataset,
            args.stage,
            args.by,
            args.reason,
            force=args.force,
            dry_run=args.dry_run,
        )
    return _report_move(args, result)


async def _rollback(args: argparse.Namespace) -> int:
    async with client_for(args, change=True) as client:
        result = await client.rollback(
            args.dataset, args.to, args.by, args.reason, force=args.force, dry_run=args.dry_run
        )
    return _report_move(args, result)


def _report_move(args: argparse.Namespace, result: dict[str, Any]) -> int:
    if result.get("dry_run"):
        return _report_dry_run(args, result)
    if args.json:
        _print_json(result)
        return 0
    note = ""
    if not result["announced"]:
        note = " (Redis unreachable: replicas will pick it up by polling)"
    forced = result.get("forced_gaps") or {}
    if forced:
        sides = ", ".join(f"the {side}'s gap (open since {_when(t)})" for side, t in forced.items())
        note += f"; forced over {sides}: audited"
    print(
        f"{result['dataset']}: {result['from']} -> {result['to']} "
        f"(version {result['version']}){note}"
    )
    return 0


def _report_dry_run(args: argparse.Namespace, result: dict[str, Any]) -> int:
    """What a real move would do; exit 3 when it would be refused (nothing changed either way)."""
    allowed = bool(result["allowed"])
    if args.json:
        _print_json(result)
    else:
        print(
            f"{result['dataset']}: dry run of {result['from']} -> {result['to']} "
            f"(version {result['version']}, write epoch {result['write_epoch']}): nothing changed"
        )
        print("checks:")
        for check in result["checks"]:
            print(f"  {'ok' if check['ok'] else 'REFUSED':8} {check['check']}: {check['detail']}")
        print("a real move would:")
        for i, step in enumerate(result["steps"], 1):
            print(f"  {i}. {step}")
        if result.get("done"):
            print("found now:")
            for finding in result["done"]:
                print(f"  - {finding}")
        print("it would be allowed" if allowed else "it would be refused:")
    if not allowed:
        raise Refused(result["refusal"])  # exit 3, the refusal on stderr like any other
    return 0


async def _gap_close(args: argparse.Namespace) -> int:
    reason = checks.require_reason(args.reason)
    checks.check_actor(args.by)
    async with client_for(args, change=True) as client:
        closed = await client.gap_close(args.dataset, args.side, args.by, reason)
    _say(
        args,
        closed,
        f"{closed['dataset']}: the {closed['side']}'s gap (open since {_when(closed['since'])}) "
        f"is closed, in {closed['stage']} (audited)",
    )
    return 0


async def _divergence(args: argparse.Namespace) -> int:
    if args.since <= 0:
        raise UsageError("--since must be a positive number of seconds")
    async with client_for(args, change=False) as client:
        found = await client.divergence(args.dataset, args.since)
    rows, errored = found["divergence"], found["errored"]
    if args.json:
        _print_json({"dataset": args.dataset, "divergence": rows, "errored": errored})
        return 0
    table = Table(title=f"{args.dataset}: mismatches in the last {args.since:g} s, by pointer")
    for col in ("part", "pointer", "kind", "count", "first seen", "last seen", "traces"):
        table.add_column(col)
    for r in rows:
        cells = (
            r["part"],
            r["pointer"] or "(whole)",
            r["kind"],
            str(r["count"]),
            _when(r["first_seen"]),
            _when(r["last_seen"]),
            " ".join(r["trace_ids"]),
        )
        table.add_row(*(Text(c) for c in cells))
    _console().print(table)
    if not rows:
        print("no mismatch recorded in that window")
    if errored:
        failed = Table(title=f"{args.dataset}: comparisons that could not be made, by reason")
        for col in ("route", "reason", "count", "first seen", "last seen"):
            failed.add_column(col)
        for r in errored:
            row = (
                r["route"],
                r["reason"],
                str(r["count"]),
                _when(r["first_seen"]),
                _when(r["last_seen"]),
            )
            failed.add_row(*(Text(c) for c in row))
        _console().print(failed)
    return 0


async def _noise(args: argparse.Namespace) -> int:
    if args.action is None:
        return await _noise_list(args)
    if not args.pointer:
        raise UsageError(
            f"name the pointer to {args.action}: "
            f"bascule noise DATASET {args.action} POINTER --reason TEXT"
        )
    reason = checks.require_reason(args.reason)
    checks.check_actor(args.by)
    async with client_for(args, change=True) as client:
        result = await client.noise_decide(
            args.dataset, args.pointer, args.action == "accept", args.by, reason, args.route
        )
    rules = ", ".join(
        f"{r['rule']}" + (f" by {r['key']}" if r["key"] else "") + f" on {r['route']}"
        for r in result["rules"]
    )
    note = ""
    if not result["announced"]:
        note = " (Redis unreachable: replicas will pick it up by polling)"
    _say(
        args,
        result,
        f"{result['dataset']}: {result['pointer']} {result['decision']} ({rules}); audited{note}",
    )
    return 0


async def _noise_list(args: argparse.Namespace) -> int:
    if args.reason is not None:
        raise UsageError("--reason goes with accept or reject")
    async with client_for(args, change=False) as client:
        found = await client.noise(args.dataset)
    rows = [r for r in found["proposals"] if args.route is None or r["route"] == args.route]
    if args.json:
        _print_json({**found, "proposals": rows})
        return 0
    table = Table(
        title=f"{args.dataset}: noise proposals (seen differing in at least "
        f"{found['min_pairs']} independent pairs of one side's answers)"
    )
    for col in (
        "status",
        "pointer",
        "rule",
        "pairs",
        "route",
        "first seen",
        "last seen",
        "decided by",
        "reason",
    ):
        table.add_column(col)
    for r in rows:
        decided = f"{r['decided_by']} {_when(r['decided_at'])}" if r["decided_at"] else ""
        cells = (
            r["status"],
            r["pointer"],
            r["rule"] + (f" by {r['key']}" if r["key"] else ""),
            str(r["pairs"]),
            r["route"],
            _when(r["first_seen"]),
            _when(r["last_seen"]),
            decided,
            r["reason"] or "",
        )
        table.add_row(*(Text(c) for c in cells))
    _console().print(table)
    if not rows:
        print("no noise proposal yet")
    return 0


async def _history(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    async with client_for(args, change=False) as client:
        rows = await client.history(args.dataset, args.limit)
    if args.json:
        _print_json({"history": rows})
        return 0
    table = Table(title="history")
    for col in ("when", "dataset", "action", "from", "to", "by", "reason"):
        table.add_column(col)
    for r in rows:
        by = r["actor"]
        details = r.get("details", {})
        if details.get("on_behalf_of"):
            by += f" for {details['on_behalf_of']}"
        action = r["action"]
        if action == "gap-close" and details.get("side"):
            action += f" {details['side']}"
        if action.startswith("noise-") and details.get("pointer"):
            action += f" {details['pointer']}"
        if r.get("forced"):
            action += " (forced)"
        cells = (
            _when(r["at"]),
            r["dataset"],
            action,
            r["from_stage"] or "",
            r["to_stage"] or "",
            by,
            r["reason"],
        )
        table.add_row(*(Text(c) for c in cells))
    _console().print(table)
    return 0


async def _journal_status(args: argparse.Namespace) -> int:
    async with client_for(args, change=False) as client:
        counts = await client.journal_status()
    names = sorted(counts)
    if args.dataset:
        if args.dataset not in names:
            raise Refused(f"unknown dataset {args.dataset!r}")
        names = [args.dataset]
    rows = [{"dataset": n, **counts.get(n, queries.EMPTY_BACKLOG)} for n in names]
    if args.json:
        _print_json({"journal": rows})
        return 0
    table = Table(title="journal")
    for col in ("dataset", "backlog", "oldest pending", "in doubt", "dead"):
        table.add_column(col)
    for r in rows:
        oldest = r["oldest_pending_seconds"]
        table.add_row(
            r["dataset"],
            str(r["backlog"]),
            f"{oldest:.1f}s" if oldest is not None else "-",
            str(r["in_doubt"]),
            str(r["dead"]),
        )
    _console().print(table)
    return 0


async def _journal_list(args: argparse.Namespace) -> int:
    state = args.state.replace("-", "_")
    async with client_for(args, change=False) as client:
        rows = await client.journal_list(state, args.dataset, args.limit)
    if args.json:
        _print_json({"entries": rows})
        return 0
    table = Table(title=f"journal entries: {args.state}")
    for col in (
        "seq",
        "dataset",
        "record",
        "route",
        "method",
        "status",
        "attempts",
        "error",
        "since",
    ):
        table.add_column(col)
    for r in rows:
        cells = (
            str(r["seq"]),
            r["dataset"],
            r["record"],
            r["route"],
            r["method"],
            str(r["status"] or "-"),
            str(r["attempts"]),
            r["last_error"] or "",
            _when(r["created_at"]),
        )
        table.add_row(*(Text(c) for c in cells))
    _console().print(table)
    return 0


async def _journal_retry(args: argparse.Namespace) -> int:
    if (args.seq is None) == (not args.all_dead):
        raise UsageError("name one entry (SEQ) or pass --all-dead")
    async with client_for(args, change=True) as client:
        count = await client.journal_retry(args.seq, args.all_dead)
    if args.seq is not None and count == 0:
        raise Refused(f"journal entry {args.seq} does not exist or is not dead")
    _say(
        args,
        {"retried": count},
        f"{count} dead entr{'y' if count == 1 else 'ies'} sent back to the replayer",
    )
    return 0


async def _journal_skip(args: argparse.Namespace) -> int:
    reason = checks.require_reason(args.reason)
    checks.check_text("by", args.by)
    async with client_for(args, change=True) as client:
        dataset = await client.journal_skip(args.seq, args.by, reason)
    _say(
        args,
        {"skipped": args.seq, "dataset": dataset},
        f"journal entry {args.seq} of {dataset} skipped (audited)",
    )
    return 0


def _say(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if args.json:
        _print_json(payload)
    else:
        print(text)


def _console() -> Console:
    """The terminal's width on a terminal; wide enough for every column in a pipe or a log."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def _when(iso: str) -> str:
    """Compact UTC time for tables (the JSON output keeps full ISO timestamps)."""
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _print_json(payload: Any) -> None:
    sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode() + "\n")
