"""The researcher-facing handler: route, plan, forward to the side that serves, stream back.

What reaches the backend is what the researcher sent — method, raw path, query string, body and
end-to-end headers (``Authorization`` included) — less hop-by-hop headers, plus
``X-Forwarded-For/Proto/Host``. Answers come back the same way, streamed when large.
Errors bascule itself produces are JSON, name the dataset, and carry ``X-Bascule-Error``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import orjson
from aiohttp import web
from multidict import CIMultiDict

from bascule.errors import RouteError, UpstreamError, UpstreamTimeout
from cutover.fleet import StageView
from cutover.stages import Stage
from proxy.plan import Side, plan
from proxy.routing import Match, Router
from proxy.upstream import Upstream

log = logging.getLogger("bascule.proxy")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Recomputed by the HTTP client or server for the message they actually send.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
STREAM_ABOVE = 64 * 1024


@dataclass
class Forwarder:
    router: Router
    view: StageView
    upstreams: Mapping[Side, Upstream]
    max_body_bytes: int

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw_path = request.raw_path.split("?", 1)[0]
        try:
            match = self.router.match(request.method, raw_path)
        except RouteError as exc:
            return error(exc.status, exc.code, str(exc), None)
        row = self.view.get(match.dataset)
        if row is None:
            return error(
                503,
                "stage_missing",
                f"no stage is recorded for dataset {match.dataset!r}: an operator must run "
                "`bascule migrate`; bascule never guesses a stage",
                match.dataset,
            )
        if match.kind == "write" and match.route is None and row.stage is not Stage.SOURCE:
            return error(
                409,
                "unrouted_write",
                f"this write matches no configured route, and dataset {match.dataset!r} is past "
                "'source': it could not be journaled safely, so it is refused",
                match.dataset,
            )
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return too_large(self.max_body_bytes, match.dataset)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return too_large(self.max_body_bytes, match.dataset)
        side = plan(row.stage, match.kind).serve
        return await self.forward(request, match, self.upstreams[side], body)

    async def forward(
        self, request: web.BaseRequest, match: Match, upstream: Upstream, body: bytes
    ) -> web.StreamResponse:
        headers = request_headers(request)
        stream: web.StreamResponse | None = None
        try:
            async with upstream.request(request.method, request.raw_path, headers, body) as resp:
                out_headers = response_headers(resp.raw_headers)
                length = resp.content_length
                if length is not None and length <= STREAM_ABOVE:
                    data = await resp.read()
                    return web.Response(status=resp.status, headers=out_headers, body=data)
                stream = web.StreamResponse(status=resp.status, headers=out_headers)
                if length is not None:
                    stream.content_length = length
                await stream.prepare(request)
                async for chunk in resp.iter_chunks():
                    await stream.write(chunk)
                await stream.write_eof()
                return stream
        except UpstreamError as exc:
            if stream is not None and stream.prepared:
                # Headers are gone already: all we can do is break the connection.
                raise ConnectionResetError(str(exc)) from exc
            status = 504 if isinstance(exc, UpstreamTimeout) else 502
            code = "backend_timeout" if status == 504 else "backend_unreachable"
            log.warning(
                "%s %s dataset=%s backend=%s: %s",
                request.method,
                match.template,
                match.dataset,
                upstream.name,
                code,
            )
            return error(status, code, str(exc), match.dataset)


def request_headers(request: web.BaseRequest) -> list[tuple[str, str]]:
    """End-to-end headers of the researcher's request, plus ``X-Forwarded-*``."""
    incoming = request.headers
    drop = _dropped(incoming.get("Connection"), _REQUEST_DROP)
    prior = None
    headers = []
    for name, value in incoming.items():
        lower = name.lower()
        if lower in drop:
            continue
        if lower == "x-forwarded-for":
            prior = value
            continue
        headers.append((name, value))
    peer = request.remote or ""
    headers.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
    headers.append(("X-Forwarded-Proto", request.scheme))
    headers.append(("X-Forwarded-Host", request.host))
    return headers


def response_headers(raw: list[tuple[str, str]]) -> CIMultiDict[str]:
    connection = next((v for k, v in raw if k.lower() == "connection"), None)
    drop = _dropped(connection, _RESPONSE_DROP)
    return CIMultiDict([(k, v) for k, v in raw if k.lower() not in drop])


def _dropped(connection: str | None, always: frozenset[str]) -> frozenset[str]:
    """Hop-by-hop names, with those the ``Connection`` header lists."""
    if not connection:
        return always
    return always | {t.strip().lower() for t in connection.split(",") if t.strip()}


def error(status: int, code: str, message: str, dataset: str | None) -> web.Response:
    payload: dict[str, object] = {"code": code, "message": message}
    if dataset is not None:
        payload["dataset"] = dataset
    return web.Response(
        status=status,
        body=orjson.dumps({"error": payload}),
        content_type="application/json",
        headers={"X-Bascule-Error": code},
    )


def too_large(limit: int, dataset: str) -> web.Response:
    return error(
        413, "body_too_large", f"the request body is larger than the {limit}-byte limit", dataset
    )
