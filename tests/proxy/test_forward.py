"""The data plane in one process: what reaches the backend, what comes back, and every error."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from bascule.app.replica import Replica
from bascule.config import Secrets
from bascule.stages import Stage
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageStore
from tests.harness import (
    AUTH,
    PROXY_ENV,
    closed_port_url,
    dcir_record,
    garbage_server,
    migrate_state,
    refapi,
    serve_app,
    serve_proxy,
    write_config,
)

BIG = 300 * 1024


def echo_backend(name: str) -> web.Application:
    """Answers with what it received, so tests can see exactly what the proxy sent."""

    async def echo(request: web.Request) -> web.StreamResponse:
        if request.path == "/big":
            return web.Response(body=b"x" * BIG, headers={"X-Served-By": name})
        if request.path == "/chunked":
            resp = web.StreamResponse(headers={"X-Served-By": name})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(50):
                await resp.write(bytes([65 + i % 26]) * 10_000)
            await resp.write_eof()
            return resp
        if request.path == "/slow":
            await asyncio.sleep(3)
        body = await request.read()
        payload = {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": body.decode("latin-1"),
        }
        return web.Response(
            body=orjson.dumps(payload),
            content_type="application/json",
            headers={
                "X-Served-By": name,
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "must-not-pass",
                "Content-Encoding": "identity",
            },
        )

    app = web.Application(client_max_size=10 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


Proxy = Callable[..., AsyncIterator[aiohttp.ClientSession]]


class Setup:
    def __init__(self, replica: Replica, proxy_url: str, pg_url: str) -> None:
        self.replica = replica
        self.url = proxy_url
        self.pg_url = pg_url

    async def set_stage(self, dataset: str, stage: Stage) -> None:
        pool = await open_pool(self.pg_url, max_size=1)
        try:
            store = StageStore(pool)
            row = await store.get(dataset)
            await store.change(dataset, row.version, stage, actor="test", reason="test")
        finally:
            await pool.close()
        await self.replica.view.reload()


async def _setup(
    stack: AsyncExitStack,
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    prefix: str,
    source_url: str,
    target_url: str,
    **kwargs: float,
) -> Setup:
    await migrate_state(pg_url)
    config = write_config(
        tmp_path / "bascule.toml",
        source_url=source_url,
        target_url=target_url,
        postgres_url=pg_url,
        redis_url=redis_url,
        redis_prefix=prefix,
        **kwargs,  # type: ignore[arg-type]
    )
    replica = await stack.enter_async_context(
        Replica(config, Secrets.from_env({**os.environ, **PROXY_ENV}), pg_url, redis_url)
    )
    url = await stack.enter_async_context(serve_proxy(replica.server()))
    return Setup(replica, url, pg_url)


@pytest.fixture
async def echo(
    tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str
) -> AsyncIterator[Setup]:
    async with AsyncExitStack() as stack:
        source = await stack.enter_async_context(serve_app(echo_backend("azure")))
        target = await stack.enter_async_context(serve_app(echo_backend("scaleway")))
        yield await _setup(
            stack, tmp_path, pg_url, redis_url, redis_prefix, source, target, read_timeout=1.0
        )


async def test_request_reaches_backend_unchanged_but_hop_by_hop(echo: Setup) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            URL(echo.url + "/v1/datasets/dcir/query?b=2&a=1&a=%2F", encoded=True),
            data=b'{"group_by": "act_code"}',
            headers={
                "Authorization": "Bearer researcher-secret",
                "X-Custom": "kept",
                "Connection": "keep-alive, X-Drop-Me",
                "X-Drop-Me": "hop",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "X-Forwarded-For": "10.1.2.3",
            },
        ) as resp:
            assert resp.status == 200
            seen = orjson.loads(await resp.read())
            assert resp.headers["X-Served-By"] == "azure"
            assert "X-Hop" not in resp.headers  # named in the backend's Connection header
            assert resp.headers["Content-Encoding"] == "identity"
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert seen["method"] == "POST"
    assert seen["raw_path"] == "/v1/datasets/dcir/query?b=2&a=1&a=%2F"
    assert seen["body"] == '{"group_by": "act_code"}'
    assert headers["authorization"] == "Bearer researcher-secret"
    assert headers["x-custom"] == "kept"
    for hop in ("x-drop-me", "keep-alive", "te"):
        assert hop not in headers
    assert headers["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == echo.url.removeprefix("http://")


async def test_large_answers_stream_through_intact(echo: Setup) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(echo.url + "/big") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(BIG)
            assert await resp.read() == b"x" * BIG
        async with session.get(echo.url + "/chunked") as resp:
            body = await resp.read()
            assert len(body) == 500_000
            assert body[:10_000] == b"A" * 10_000 and body[-10_000:] == b"X" * 10_000


async def test_reads_and_writes_follow_the_stage(echo: Setup) -> None:
    async with aiohttp.ClientSession() as session:

        async def served_by(method: str, path: str) -> str:
            async with session.request(method, echo.url + path, data=b"{}") as resp:
                assert resp.status == 200
                return resp.headers["X-Served-By"]

        expected = {
            Stage.SOURCE: ("azure", "azure"),
            Stage.DUALWRITE: ("azure", "azure"),
            Stage.SHADOW: ("azure", "azure"),
            Stage.LIVE: ("scaleway", "scaleway"),
            Stage.RAMPDOWN: ("scaleway", "scaleway"),
            Stage.TARGET: ("scaleway", "scaleway"),
        }
        for stage, (reads, writes) in expected.items():
            if stage is not Stage.SOURCE:
                await echo.set_stage("dcir", stage)
            assert await served_by("GET", "/v1/datasets/dcir/records/7") == reads, stage
            assert await served_by("POST", "/v1/datasets/dcir/query") == reads, stage
            assert await served_by("PATCH", "/v1/datasets/dcir/records/7") == writes, stage
            # Another dataset is untouched by dcir's stage.
            assert await served_by("GET", "/v1/datasets/pmsi/records/7") == "azure"


async def _error(
    session: aiohttp.ClientSession, method: str, url: str | URL, **kw: Any
) -> dict[str, Any]:
    async with session.request(method, url, **kw) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        payload = orjson.loads(await resp.read())
        error = payload["error"]
        assert resp.headers["X-Bascule-Error"] == error["code"]
        error["status"] = resp.status
        return dict(error)


async def test_bad_requests_get_clear_json_errors(echo: Setup) -> None:
    async with aiohttp.ClientSession() as session:
        e = await _error(session, "GET", echo.url + "/v1/datasets/secret_ds/records")
        assert (e["status"], e["code"]) == (404, "unknown_dataset")
        assert "secret_ds" in e["message"]
        e = await _error(
            session, "GET", URL(echo.url + "/v1/datasets/dcir/..%2F..%2Fadmin", encoded=True)
        )
        assert (e["status"], e["code"]) == (400, "bad_path")
        e = await _error(
            session,
            "POST",
            echo.url + "/v1/datasets/dcir/records",
            data=io.BytesIO(b"x" * (2 * 1024 * 1024)),
        )
        assert (e["status"], e["code"], e["dataset"]) == (413, "body_too_large", "dcir")
        assert "1048576-byte limit" in e["message"]


async def test_oversized_chunked_body_is_refused(echo: Setup) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"y" * 65536

    async with aiohttp.ClientSession() as session:
        e = await _error(session, "POST", echo.url + "/v1/datasets/dcir/records", data=chunks())
        assert (e["status"], e["code"]) == (413, "body_too_large")


async def test_unrouted_write_is_refused_once_default_is_past_source(echo: Setup) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(echo.url + "/v2/anything", data=b"{}") as resp:
            assert resp.status == 200  # default is at source: passed through
        await echo.set_stage("default", Stage.DUALWRITE)
        e = await _error(session, "POST", echo.url + "/v2/anything", data=b"{}")
        assert (e["status"], e["code"], e["dataset"]) == (409, "unrouted_write", "default")
        async with session.get(echo.url + "/v2/anything") as resp:
            assert resp.status == 200  # unrouted reads still pass


async def test_backend_timeout_is_504(echo: Setup) -> None:
    async with aiohttp.ClientSession() as session:
        e = await _error(session, "GET", echo.url + "/slow")
        assert (e["status"], e["code"], e["dataset"]) == (504, "backend_timeout", "default")
        assert "azure" in e["message"]


async def test_stage_missing_is_503_never_a_guess(
    echo: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Missing from the view for the whole test: its poll of the store (every 0.5 s) would put
    # a popped entry back, mid-request on a slow machine.
    view = echo.replica.view
    known = view.get
    monkeypatch.setattr(view, "get", lambda name: None if name == "pmsi" else known(name))
    async with aiohttp.ClientSession() as session:
        e = await _error(session, "GET", echo.url + "/v1/datasets/pmsi/records/1")
        assert (e["status"], e["code"]) == (503, "stage_missing")


async def test_unreachable_and_garbage_backends_are_502(
    tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str
) -> None:
    async with AsyncExitStack() as stack:
        garbage = await stack.enter_async_context(garbage_server())
        setup = await _setup(
            stack, tmp_path, pg_url, redis_url, redis_prefix, closed_port_url(), garbage
        )
        async with aiohttp.ClientSession() as session:
            e = await _error(session, "GET", setup.url + "/v1/datasets/dcir/records/1")
            assert (e["status"], e["code"]) == (502, "backend_unreachable")
            assert "cannot connect" in e["message"]
            await setup.set_stage("dcir", Stage.DUALWRITE)
            await setup.set_stage("dcir", Stage.SHADOW)
            await setup.set_stage("dcir", Stage.LIVE)
            e = await _error(session, "GET", setup.url + "/v1/datasets/dcir/records/1")
            assert (e["status"], e["code"]) == (502, "backend_unreachable")
            assert "scaleway" in e["message"]


async def test_reference_api_answers_through_the_proxy(
    tmp_path: Path,
    make_database: Callable[[str], object],
    pg_url: str,
    redis_url: str,
    redis_prefix: str,
) -> None:
    src_db = await make_database("src")  # type: ignore[misc]
    tgt_db = await make_database("tgt")  # type: ignore[misc]
    async with AsyncExitStack() as stack:
        source = await stack.enter_async_context(refapi("azure", src_db))
        target = await stack.enter_async_context(refapi("scaleway", tgt_db))
        setup = await _setup(stack, tmp_path, pg_url, redis_url, redis_prefix, source, target)
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.post(
                setup.url + "/v1/datasets/dcir/records",
                json=dcir_record(1),
            ) as resp:
                created = await resp.json()
                assert resp.status == 201, created
                assert resp.headers["X-Served-By"] == "azure"
            rid = created["record"]["id"]
            async with session.get(setup.url + f"/v1/datasets/dcir/records/{rid}") as resp:
                assert resp.status == 200
                assert (await resp.json())["record"] == created["record"]
        async with aiohttp.ClientSession() as anonymous:
            async with anonymous.get(setup.url + "/v1/datasets/dcir/records/1") as resp:
                assert resp.status == 401  # the backend's answer, passed through
