"""``bascule api``: run the reference API, or seed its database (``bascule api seed``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
from collections.abc import Coroutine
from typing import Any

import asyncpg
from aiohttp import web

from bascule.errors import ConfigError, StoreError, UsageError
from bascule.state.servers import redact_url
from refapi.app import create_app, tls_context
from refapi.auth import TOKENS_ENV, parse_tokens
from refapi.datasets import DATASETS
from refapi.seed import seed_database

_log = logging.getLogger("refapi")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "api",
        help="the reference researcher API (a stand-in for the SNDS API, for demo/tests/bench)",
        description=(
            "Run the reference researcher API, a stand-in for the SNDS query API. "
            f"Bearer tokens come from {TOKENS_ENV} (comma-separated)."
        ),
    )
    parser.add_argument("--name", help="instance name, sent back in X-Served-By")
    parser.add_argument("--database", help="Postgres URL of the instance's database")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, help="port to listen on")
    parser.add_argument(
        "--ignore-idempotency-keys",
        action="store_true",
        help="apply every write even when its Idempotency-Key was seen (as some backends do)",
    )
    parser.add_argument("--pool-size", type=int, default=10, help="database connections")
    parser.add_argument("--tls-cert", help="serve https with this certificate (PEM file)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM file)")
    parser.add_argument(
        "--tls-client-ca",
        help="require client certificates signed by one of these CAs (PEM file): mTLS",
    )
    parser.set_defaults(func=lambda args: _serve(parser, args))

    actions = parser.add_subparsers(dest="api_command", metavar="{seed}")
    seed = actions.add_parser("seed", help="fill the datasets with deterministic synthetic rows")
    seed.add_argument("--database", required=True, help="Postgres URL to seed")
    seed.add_argument("--rows", type=int, required=True, help="rows per dataset")
    seed.add_argument("--seed", type=int, default=1, help="seed of the synthetic data")
    seed.add_argument(
        "--datasets",
        default=",".join(DATASETS),
        help=f"comma-separated datasets (default: {','.join(DATASETS)})",
    )
    seed.set_defaults(func=_seed)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    missing = [f"--{k}" for k in ("name", "database", "port") if getattr(args, k) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    tokens = parse_tokens(os.environ.get(TOKENS_ENV, ""))
    try:
        app = create_app(
            args.name,
            args.database,
            tokens,
            honour_idempotency=not args.ignore_idempotency_keys,
            pool_size=args.pool_size,
        )
    except ValueError as exc:
        raise ConfigError("environment", TOKENS_ENV, str(exc)) from None
    return _run(_serve_until_stopped(app, args))


async def _serve_until_stopped(app: web.Application, args: argparse.Namespace) -> int:
    # aiohttp's access log prints full URLs (record ids, query strings); ours prints templates.
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    try:
        await runner.setup()
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise StoreError(f"database {redact_url(args.database)}: {exc}") from None
    try:
        tls = None
        if args.tls_cert is not None:
            try:
                tls = tls_context(args.tls_cert, args.tls_key, args.tls_client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"--tls-cert/--tls-key/--tls-client-ca: {exc}") from None
        site = web.TCPSite(runner, args.host, args.port, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
        host, port = runner.addresses[0][:2]  # the bound port, when --port 0 asked for any
        _log.info(
            "reference API %s listening on %s://%s:%d (idempotency keys %s)",
            args.name,
            "http" if tls is None else "https",
            host,
            port,
            "ignored" if args.ignore_idempotency_keys else "honoured",
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        _log.info("reference API %s stopping", args.name)
    finally:
        await runner.cleanup()
    return 0


def _seed(args: argparse.Namespace) -> int:
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown or not datasets:
        raise UsageError(
            f"--datasets: unknown {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(DATASETS)}"
        )
    if args.rows < 0:
        raise UsageError("--rows must not be negative")
    return _run(_seed_and_report(args.database, args.rows, args.seed, datasets))


async def _seed_and_report(database: str, rows: int, seed: int, datasets: list[str]) -> int:
    try:
        timings = await seed_database(database, rows, seed=seed, datasets=datasets)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise StoreError(f"database {redact_url(database)}: {exc}") from None
    for name, seconds in timings.items():
        print(f"{name}: {rows} rows in {seconds:.1f}s (seed {seed})", flush=True)
    return 0
