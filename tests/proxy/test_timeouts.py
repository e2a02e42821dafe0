"""Time limits toward the backends and from researchers (issue 16, item 9): what legitimate
work gets (silence that resets on every byte, per route), and where a bound was missing (the
whole exchange, the wait for a pooled connection, reusing an idle connection, receiving a
request). Each limit is caused for real by a slow, stalled or closing server, with small
limits so the tests run fast; bounds on time are asserted loosely, as what a limit means."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from typing import Any, cast

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from bascule.app.replica import create_proxy_server
from bascule.config import Backend, ProxySettings, Route
from bascule.errors import UpstreamBusy, UpstreamTimeout, UpstreamUnreachable
from bascule.stages import Stage
from bascule.tasks import spawn
from bascule.upstream import Upstream
from proxy.forward import Forwarder
from proxy.server import Request as ResearcherRequest
from proxy.server import Responder
from refapi.lab import AUTH
from tests.conftest import Ground
from tests.harness import Forward, late, serve_proxy
from tests.proxy.test_http1 import Conn, Misbehaving, answering, ok, raw_server
from tests.world import Hooks, build_world


@asynccontextmanager
async def upstream(url: str, **limits: Any) -> AsyncIterator[Upstream]:
    settings: dict[str, Any] = {"connect_timeout": 1.0, "read_timeout": 5.0, "pool_size": 4}
    up = Upstream("test", Backend(url=url, **{**settings, **limits}))
    await up.open()
    try:
        yield up
    finally:
        await up.close()


async def fetch(up: Upstream, path: str = "/", method: str = "GET", **options: Any) -> int:
    async with asyncio.timeout(10):  # a hang fails the test instead of stalling it
        async with up.request(method, path, [], b"{}" if method != "GET" else b"", **options) as r:
            await r.read()
            return r.status


BODIES = {"PATCH": {"amount": 7}, "POST": {"group_by": "department", "metrics": ["count"]}}


async def statuses(world: Any, rows: list[tuple[str, str]]) -> list[tuple[int, str | None]]:
    """(status, X-Bascule-Error) of each (method, path) sent at once through the proxy."""

    async def one(session: aiohttp.ClientSession, method: str, path: str) -> tuple[int, str | None]:
        body = BODIES.get(method)
        async with session.request(method, world.proxy + path, json=body) as resp:
            await resp.read()
            return resp.status, resp.headers.get("X-Bascule-Error")

    async with aiohttp.ClientSession(headers=AUTH) as session:
        return list(await asyncio.gather(*(one(session, m, p) for m, p in rows)))


# -- silence: reset by every byte, and per route ----------------------------------------------


def test_the_defaults_are_no_stricter_than_what_researchers_live_with() -> None:
    backend = Backend(url="http://x")
    # nginx in front of the API today: 60 s without a byte, and no total.
    assert backend.read_timeout >= 60.0
    assert backend.total_timeout >= 3600.0  # a stop for what never ends, not for answers
    assert backend.write_timeout > 2.0 + 30.0  # the old hard write deadline
    assert ProxySettings().receive_timeout == 60.0


async def test_a_route_gives_a_silent_aggregate_the_time_it_needs(ground: Ground) -> None:
    # An aggregate computes before it answers: silent longer than the backend's read_timeout.
    # Its route gives it more (the key was unknown); a record read stays under the backend's.
    async with build_world(
        ground,
        rows=3,
        read_timeout=0.4,
        hooks=Hooks(source=late(1.0)),
        extra="read_timeout = 5.0\n",  # in the last route, the query's
    ) as world:
        got = await statuses(
            world,
            [("POST", "/v1/datasets/dcir/query"), ("GET", "/v1/datasets/dcir/records/1")],
        )
    assert got == [(200, None), (504, "backend_timeout")]


def trickling(pieces: int, every: float) -> Any:
    """A relay hook: the backend applies a write at once; its answer then comes in ``pieces``
    parts, one every ``every`` seconds (a backend that streams its answer while it works)."""

    async def hook(request: web.Request, forward: Forward) -> web.StreamResponse:
        answer = await forward()
        if request.method == "GET":
            return answer
        body = answer.body
        assert isinstance(body, bytes)
        resp = web.StreamResponse(status=answer.status)
        resp.content_type = "application/json"
        await resp.prepare(request)
        size = -(-len(body) // pieces)
        for i in range(pieces):
            await asyncio.sleep(every)
            await resp.write(body[i * size : (i + 1) * size])
        await resp.write_eof()
        return resp

    return hook


async def test_a_write_answered_while_the_backend_streams_is_not_cut(ground: Ground) -> None:
    # Silent at most 0.3 s at a time, 2.4 s in all: past the old hard deadline
    # (connect_timeout + read_timeout = 1.5 s), which answered 504 for a write the backend had
    # applied, and left it in doubt.
    async with build_world(
        ground,
        rows=3,
        read_timeout=0.5,
        write_timeout=10.0,
        hooks=Hooks(source=trickling(pieces=8, every=0.3)),
        stages=(Stage.DUALWRITE,),
    ) as world:
        assert await statuses(world, [("PATCH", "/v1/datasets/dcir/records/2")]) == [(200, None)]
        counts = await world.drained()
        rows = await world.sql(world.target_db, "SELECT amount FROM dcir WHERE id = 2")
    assert counts == {"applied": 1}
    assert float(rows[0]["amount"]) == 7.0  # replayed to the target


# -- the whole exchange, and the pool ---------------------------------------------------------


async def test_a_trickling_answer_ends_at_its_total() -> None:
    async def trickle(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while True:  # a byte now and then: never silent long enough for read_timeout
            await conn.send(b"x")
            await asyncio.sleep(0.05)

    route = Route(path="/slow", methods=("GET",), kind="read", dataset="d", total_timeout=0.5)
    async with raw_server(trickle) as srv, upstream(srv.url, read_timeout=0.3) as up:
        with pytest.raises(UpstreamTimeout, match=r"did not finish its answer within 0\.5 s"):
            await fetch(up, "/slow", route=route)


@pytest.mark.parametrize("read", ["streaming", "read whole"])
async def test_a_stalled_consumer_gives_its_pool_slot_back_at_the_deadline(read: str) -> None:
    # The consumer takes the answer and never reads on (a researcher who stopped reading):
    # its slot was held forever, and every other request waited for it without bound.
    size = 4 * 1024 * 1024 if read == "streaming" else 10

    async def handle(conn: Conn) -> None:
        while (request := await conn.request()) is not None:
            body = b"y" * (size if request.path == "/big" else 2)
            await conn.send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            await conn.send(body)

    patient = Route(path="/small", methods=("GET",), kind="read", dataset="d", total_timeout=5)
    async with raw_server(handle) as srv, upstream(srv.url, pool_size=1, total_timeout=0.5) as up:
        got: list[bytes] = []
        with pytest.raises(UpstreamTimeout) if read == "streaming" else nullcontext():
            async with up.request("GET", "/big", [], b"") as stalled:
                assert stalled.status == 200
                # It gets the slot at the stalled one's deadline.
                assert await fetch(up, "/small", route=patient) == 200
                got.append(await stalled.read())  # cut, or whole if it had come whole
        assert got == ([] if read == "streaming" else [b"y" * size])
        assert await fetch(up, "/small") == 200  # and no slot was given back twice
        assert up._pool is not None and up._pool._slots._value == 1


async def test_no_free_connection_in_time_is_busy_and_never_sent() -> None:
    server = Misbehaving()
    async with raw_server(server) as srv:
        async with upstream(srv.url, pool_size=1, pool_timeout=0.2, read_timeout=30) as up:
            hanging = spawn(fetch(up, "/hang"), name="a request that holds the only slot")
            await server.hanging.wait()
            with pytest.raises(UpstreamBusy, match="all 1 connections stayed busy") as caught:
                await fetch(up, "/", "POST")
            hanging.cancel()
            with pytest.raises(asyncio.CancelledError):
                await hanging
    assert caught.value.sent is False and caught.value.status == 503
    assert srv.count("POST") == 0


async def test_the_proxy_answers_busy_quickly_when_the_pool_is_taken(ground: Ground) -> None:
    # One connection to the source, held 2 s by a slow read: the next requests are refused
    # after pool_timeout (503, never sent: a write is not in doubt) instead of queueing.
    async with build_world(
        ground,
        rows=3,
        hooks=Hooks(source=late(2.0)),
        backend_extra="pool_size = 1\npool_timeout = 0.3\n",
        stages=(Stage.DUALWRITE,),
    ) as world:
        first = spawn(statuses(world, [("GET", "/v1/datasets/dcir/records/1")]), name="a slow read")
        await asyncio.sleep(0.5)  # the first holds the only connection
        got = await statuses(
            world,
            [("GET", "/v1/datasets/dcir/records/2"), ("PATCH", "/v1/datasets/dcir/records/3")],
        )
        assert await first == [(200, None)]
        conn = await asyncpg.connect(world.state_db)
        try:
            states = [r["state"] for r in await conn.fetch("SELECT state FROM bascule_journal")]
        finally:
            await conn.close()
    assert got == [(503, "backend_busy"), (503, "backend_busy")]
    assert states == ["rejected"]  # not sent: nothing to replay, nothing in doubt


# -- keep-alive: never reuse a connection the backend may have closed -------------------------


def closes_idle_after(seconds: float) -> Any:
    """A backend that closes a connection idle for ``seconds``: modelled at the worst moment,
    its close crossing the client's next request, which it reads and never answers."""

    async def handle(conn: Conn) -> None:
        answered = None
        while (request := await conn.request()) is not None:
            if answered is not None and time.monotonic() - answered > seconds:
                return  # closed, unanswered
            await conn.send(ok())
            answered = time.monotonic()
            del request

    return handle


@pytest.mark.parametrize("keepalive", [0.3, 0.0])
async def test_a_post_after_the_backends_keepalive_goes_on_a_fresh_connection(
    keepalive: float,
) -> None:
    # The fixed 30 s reuse window sent a POST onto a connection the backend had closed: in doubt.
    async with raw_server(closes_idle_after(0.5)) as srv:
        async with upstream(srv.url, keepalive_timeout=keepalive) as up:
            assert await fetch(up, "/a") == 200
            await asyncio.sleep(0.7)
            assert await fetch(up, "/b", "POST") == 200
    assert srv.count("POST") == 1 and srv.connections == 2


async def test_without_expiry_the_post_would_be_in_doubt() -> None:
    # The same backend with a reuse window longer than its keep-alive: what the expiry avoids.
    async with raw_server(closes_idle_after(0.2)) as srv:
        async with upstream(srv.url, keepalive_timeout=30.0) as up:
            assert await fetch(up, "/a") == 200
            await asyncio.sleep(0.4)
            with pytest.raises(UpstreamUnreachable) as caught:
                await fetch(up, "/b", "POST")
    assert caught.value.sent is True  # the backend read it: in doubt


async def test_a_connection_within_the_keepalive_is_reused() -> None:
    async with raw_server(answering(lambda _: ok())) as srv:
        async with upstream(srv.url, keepalive_timeout=5.0) as up:
            for _ in range(3):
                assert await fetch(up, "/", "POST") == 200
    assert srv.connections == 1


# -- receiving a researcher's request ---------------------------------------------------------


class _Answers:
    async def handle(self, request: ResearcherRequest, out: Responder) -> None:
        await out.send(200, [], b"ok")

    def dataset_of(self, method: str, target: str) -> str | None:
        return None


@pytest.mark.parametrize("kept_alive", [False, True])
async def test_the_receive_timeout_is_honoured_to_the_second(kept_alive: bool) -> None:
    # A client trickling its headers, a line every 0.2 s: refused once `[proxy]
    # receive_timeout` has passed since its request began, not at the idle timeout (75 s
    # against a documented 60).
    settings = ProxySettings(receive_timeout=1.0, idle_timeout=4.0)
    server = create_proxy_server(cast(Forwarder, _Answers()), settings)
    async with serve_proxy(server) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            if kept_alive:
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
                await asyncio.sleep(0.5)
            began = time.monotonic()
            writer.write(b"GET / HTTP/1.1\r\n")

            async def trickle() -> None:
                while True:
                    await asyncio.sleep(0.2)
                    writer.write(b"X-Slow: 1\r\n")

            task = spawn(trickle(), name="a client trickling its headers")
            try:
                async with asyncio.timeout(10):
                    answer = await reader.read(200)
            finally:
                task.cancel()
            took = time.monotonic() - began
        finally:
            writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert 1.0 <= took < 2.0, took  # within the second after receive_timeout
