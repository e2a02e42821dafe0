"""The data plane in one process: what reaches the backend, what comes back, and every error."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from bascule.stages import Stage
from refapi.lab import AUTH
from tests.conftest import Ground
from tests.harness import catch_all, closed_port_url, dcir_record, garbage_server
from tests.world import LIVE, World, build_world

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

    return catch_all(echo, client_max_size=10 * 1024 * 1024)


@pytest.fixture
async def echo(ground: Ground) -> AsyncIterator[World]:
    async with build_world(ground, backends=echo_backend, read_timeout=1.0) as world:
        yield world


async def test_request_reaches_backend_unchanged_but_hop_by_hop(echo: World) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            URL(echo.proxy + "/v1/datasets/dcir/query?b=2&a=1&a=%2F", encoded=True),
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
    assert headers["x-forwarded-host"] == echo.proxy.removeprefix("http://")


async def test_large_answers_stream_through_intact(echo: World) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(echo.proxy + "/big") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(BIG)
            assert await resp.read() == b"x" * BIG
        async with session.get(echo.proxy + "/chunked") as resp:
            body = await resp.read()
            assert len(body) == 500_000
            assert body[:10_000] == b"A" * 10_000 and body[-10_000:] == b"X" * 10_000


async def test_reads_and_writes_follow_the_stage(echo: World) -> None:
    async with aiohttp.ClientSession() as session:

        async def served_by(method: str, path: str) -> str:
            async with session.request(method, echo.proxy + path, data=b"{}") as resp:
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
                await echo.to_stage(stage)
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


async def test_bad_requests_get_clear_json_errors(echo: World) -> None:
    async with aiohttp.ClientSession() as session:
        e = await _error(session, "GET", echo.proxy + "/v1/datasets/secret_ds/records")
        assert (e["status"], e["code"]) == (404, "unknown_dataset")
        assert "secret_ds" in e["message"]
        # A path that could be read as naming an undeclared dataset is refused as one.
        e = await _error(
            session,
            "GET",
            URL(echo.proxy + "/v1/datasets/dcir%2F..%2Fsecret_ds/records", encoded=True),
        )
        assert (e["status"], e["code"]) == (404, "unknown_dataset")
        # One that could not (every reading is dcir's or unrouted, all at source) is served.
        ambiguous = "/v1/datasets/dcir/..%2F..%2Fadmin"
        async with session.get(URL(echo.proxy + ambiguous, encoded=True)) as resp:
            assert resp.status == 200 and (await resp.json())["raw_path"] == ambiguous
        e = await _error(
            session,
            "POST",
            echo.proxy + "/v1/datasets/dcir/records",
            data=io.BytesIO(b"x" * (2 * 1024 * 1024)),
        )
        assert (e["status"], e["code"], e["dataset"]) == (413, "body_too_large", "dcir")
        assert "1048576-byte limit" in e["message"]


async def test_oversized_chunked_body_is_refused(echo: World) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"y" * 65536

    async with aiohttp.ClientSession() as session:
        e = await _error(session, "POST", echo.proxy + "/v1/datasets/dcir/records", data=chunks())
        assert (e["status"], e["code"]) == (413, "body_too_large")


async def test_unrouted_write_is_refused_once_default_is_past_source(echo: World) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(echo.proxy + "/v2/anything", data=b"{}") as resp:
            assert resp.status == 200  # default is at source: passed through
        await echo.to_stage(Stage.DUALWRITE, dataset="default")
        e = await _error(session, "POST", echo.proxy + "/v2/anything", data=b"{}")
        assert (e["status"], e["code"], e["dataset"]) == (409, "unrouted_write", "default")
        async with session.get(echo.proxy + "/v2/anything") as resp:
            assert resp.status == 200  # unrouted reads still pass


async def test_backend_timeout_is_504(echo: World) -> None:
    async with aiohttp.ClientSession() as session:
        e = await _error(session, "GET", echo.proxy + "/slow")
        assert (e["status"], e["code"], e["dataset"]) == (504, "backend_timeout", "default")
        assert "azure" in e["message"]


async def test_stage_missing_is_503_never_a_guess(
    echo: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Missing from the view for the whole test: its poll of the store (every 0.5 s) would put
    # a popped entry back, mid-request on a slow machine.
    view = echo.replica.view
    known = view.get
    monkeypatch.setattr(view, "get", lambda name: None if name == "pmsi" else known(name))
    async with aiohttp.ClientSession() as session:
        e = await _error(session, "GET", echo.proxy + "/v1/datasets/pmsi/records/1")
        assert (e["status"], e["code"]) == (503, "stage_missing")


async def test_unreachable_and_garbage_backends_are_502(ground: Ground) -> None:
    async with (
        garbage_server() as garbage,
        build_world(ground, backends=(closed_port_url(), garbage)) as setup,
    ):
        async with aiohttp.ClientSession() as session:
            e = await _error(session, "GET", setup.proxy + "/v1/datasets/dcir/records/1")
            assert (e["status"], e["code"]) == (502, "backend_unreachable")
            assert "cannot connect" in e["message"]
            await setup.to_stage(*LIVE)
            e = await _error(session, "GET", setup.proxy + "/v1/datasets/dcir/records/1")
            assert (e["status"], e["code"]) == (502, "backend_unreachable")
            assert "scaleway" in e["message"]


async def test_reference_api_answers_through_the_proxy(ground: Ground) -> None:
    async with build_world(ground, rows=0) as setup:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.post(
                setup.proxy + "/v1/datasets/dcir/records",
                json=dcir_record(1),
            ) as resp:
                created = await resp.json()
                assert resp.status == 201, created
                assert resp.headers["X-Served-By"] == "azure"
            rid = created["record"]["id"]
            async with session.get(setup.proxy + f"/v1/datasets/dcir/records/{rid}") as resp:
                assert resp.status == 200
                assert (await resp.json())["record"] == created["record"]
        async with aiohttp.ClientSession() as anonymous:
            async with anonymous.get(setup.proxy + "/v1/datasets/dcir/records/1") as resp:
                assert resp.status == 401  # the backend's answer, passed through
