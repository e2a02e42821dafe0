"""Hardening found by a red-team review: routing escapes, header handling, the HTTP/1.1 server.

Each test was written failing, as the reproduction of a defect, before its fix.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from bascule.errors import RouteError
from refapi.lab import AUTH, RESEARCHER_TOKEN
from tests.conftest import Ground
from tests.harness import catch_all, dcir_record, serve_app
from tests.world import LIVE, World, build_world

pytestmark = pytest.mark.timeout(60)


def seeing_backend(name: str) -> web.Application:
    """Says which backend it is and which path *it* resolved (as the real aiohttp refapi does)."""

    async def echo(request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(
                {
                    "served_by": name,
                    "path": request.path,
                    "raw_path": request.raw_path,
                    "headers": [
                        [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers
                    ],
                }
            ),
            content_type="application/json",
            headers={"X-Served-By": name},
        )

    return catch_all(echo)


@pytest.fixture
async def seeing(ground: Ground) -> AsyncIterator[World]:
    async with build_world(ground, backends=seeing_backend, read_timeout=2.0) as world:
        yield world


async def raw_request(url: str, head: bytes, body: bytes = b"") -> tuple[int, bytes, bytes]:
    """Send bytes exactly as given; return (status, headers block, body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + body)
    await writer.drain()
    async with asyncio.timeout(10):
        data = await reader.read()  # Connection: close in every head
    writer.close()
    headers, _, rest = data.partition(b"\r\n\r\n")
    return int(headers.split(b" ", 2)[1]), headers, rest


# --- F1: a '#' in the request target moves a write out of its dataset --------------------------


async def test_fragment_in_target_cannot_move_a_write_off_its_dataset(seeing: World) -> None:
    """pmsi is live (target authoritative); default stays at source. A create in pmsi must reach
    the target, or be refused. With '#x' appended to the literal segment, bascule sees no route,
    files it as an *unrouted* write of 'default' (allowed: default is at source) and sends it to
    the SOURCE, whose HTTP server drops the fragment and creates a record in pmsi there."""
    await seeing.to_stage(*LIVE, dataset="pmsi")
    head = (
        b"POST /v1/datasets/pmsi/records HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n"
    )
    status, _, body = await raw_request(seeing.proxy, head, b"{}")
    assert status == 200 and orjson.loads(body)["served_by"] == "scaleway"  # control: correct

    head = head.replace(b"/records ", b"/records#x ")
    status, _, body = await raw_request(seeing.proxy, head, b"{}")
    seen = orjson.loads(body) if status == 200 else {}
    assert status >= 400 or seen["served_by"] == "scaleway", (
        f"create in pmsi (live, target authoritative) was sent to {seen.get('served_by')}; "
        f"the backend resolved the path {seen.get('path')!r}"
    )


async def test_fragment_is_not_part_of_the_record_key(seeing: World) -> None:
    """The record key is what the record lock (and, later, the journal) serialize on; the backend
    applies '/records/7#a' and '/records/7#b' both to record 7."""
    with pytest.raises(RouteError) as info:
        seeing.replica.forwarder().router.match("PUT", "/v1/datasets/pmsi/records/7#a")
    assert info.value.code == "bad_path"  # refused outright: no key the backend does not use


# --- F5: spoofable X-Forwarded-Host / -Proto ---------------------------------------------------


async def test_researcher_cannot_supply_x_forwarded_host_or_proto(seeing: World) -> None:
    head = (
        b"GET /v1/datasets/dcir/records/1 HTTP/1.1\r\nHost: proxy.example\r\n"
        b"X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n"
    )
    _status, _, body = await raw_request(seeing.proxy, head)
    headers = [(k.lower(), v) for k, v in orjson.loads(body)["headers"]]
    hosts = [v for k, v in headers if k == "x-forwarded-host"]
    protos = [v for k, v in headers if k == "x-forwarded-proto"]
    assert hosts == ["proxy.example"] and protos == ["http"], (hosts, protos)


# --- F6: HEAD answers lose their Content-Length -------------------------------------------------


async def test_head_keeps_the_backends_content_length(ground: Ground) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5000)

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)  # aiohttp answers HEAD for GET routes
    async with (
        serve_app(app) as url,
        build_world(ground, backends=(url, url), read_timeout=2.0) as setup,
    ):
        head = b"HEAD /v1/datasets/dcir/records/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        status, headers, _ = await raw_request(setup.proxy, head)
        assert status == 200
        assert b"content-length: 5000" in headers.lower(), headers


# --- F7: an HTTP/1.0 client is sent chunked framing it cannot read -----------------------------


async def test_http10_client_never_gets_chunked(ground: Ground) -> None:
    """RFC 9112 7.1: chunked MUST NOT be sent to an HTTP/1.0 recipient."""

    async def streamed(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"line one\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", streamed)
    async with (
        serve_app(app) as url,
        build_world(ground, backends=(url, url), read_timeout=2.0) as setup,
    ):
        status, headers, body = await raw_request(
            setup.proxy, b"GET /v1/datasets/dcir/records HTTP/1.0\r\nHost: x\r\n\r\n"
        )
        assert status == 200
        assert b"chunked" not in headers.lower() and body == b"line one\n", (headers, body)


async def test_fragment_create_lands_on_the_retired_side_with_the_reference_api(
    ground: Ground,
) -> None:
    """End to end with refapi: dcir is live (target serves and is authoritative). A create sent
    as 'POST /v1/datasets/dcir/records#x' gets a 201 -- from the SOURCE; reading the new record
    back through the proxy (served by the target) finds nothing."""
    async with build_world(ground, rows=0, read_timeout=2.0) as setup:
        source, target = setup.source_url, setup.target_url
        await setup.to_stage(*LIVE)
        body = orjson.dumps(dcir_record(1))
        head = (
            "POST /v1/datasets/dcir/records#x HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {RESEARCHER_TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        status, _headers, answer = await raw_request(setup.proxy, head, body)
        # Refused outright, and neither side got a record.
        assert status == 400 and orjson.loads(answer)["error"]["code"] == "bad_path", answer
        async with aiohttp.ClientSession(headers=AUTH) as session:
            for side in (source, target):
                async with session.get(f"{side}/v1/datasets/dcir/records?limit=1") as resp:
                    assert (await resp.json())["records"] == []


# --- F8: chunked-request trailers become request headers --------------------------------------


async def test_request_trailers_are_not_promoted_to_headers(seeing: World) -> None:
    """RFC 9110 6.5.2: trailer fields must not be merged into the header section. A gateway in
    front of bascule that strips/sets identity headers looks at the header section only."""
    head = (
        b"POST /v1/datasets/dcir/query HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
    )
    body = b"2\r\n{}\r\n0\r\nX-Remote-User: admin\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    status, _, answer = await raw_request(seeing.proxy, head, body)
    assert status == 200, answer
    headers = {k.lower(): v for k, v in orjson.loads(answer)["headers"]}
    assert "x-remote-user" not in headers, headers
    assert not headers["x-forwarded-for"].startswith("6.6.6.6"), headers


# --- F9: HEAD of a GET route leaves its dataset ------------------------------------------------


async def test_head_follows_the_get_routes_dataset(seeing: World) -> None:
    """Backends (aiohttp, Starlette, ASP.NET...) answer HEAD wherever they answer GET; bascule
    only matches methods literally, so HEAD of a pmsi record is routed as 'default'."""
    router = seeing.replica.forwarder().router
    assert router.match("GET", "/v1/datasets/pmsi/records/7").dataset == "pmsi"
    assert router.match("HEAD", "/v1/datasets/pmsi/records/7").dataset == "pmsi"
