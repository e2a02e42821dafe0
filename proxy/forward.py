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

from bascule.errors import RouteError, UpstreamError, UpstreamTimeout
from cutover.fleet import StageView
from proxy.answers import HOP_BY_HOP, dropped, error, response_headers, without
from proxy.dualwrite import DualWriter
from proxy.plan import Side, plan
from proxy.routing import Match, Router
from proxy.server import Request, Responder
from proxy.upstream import Upstream

log = logging.getLogger("bascule.proxy")

# Recomputed by the HTTP client or server for the message they actually send; and headers only
# bascule may set (a researcher must not be able to claim another host, scheme or client, or
# pose as a shadow read).
_REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "x-forwarded-host",
    "x-forwarded-proto",
    "forwarded",
    "x-real-ip",
}
STREAM_ABOVE = 64 * 1024


@dataclass
class Forwarder:
    router: Router
    view: StageView
    upstreams: Mapping[Side, Upstream]
    dual: DualWriter | None = None
    """The fenced, journaled write path, taken by every write; None when the journal keys are
    not configured: writes in dual-write stages are then refused (503) rather than left
    unjournaled, and the others go by this replica's view of the stages, unfenced."""
    scheme: str = "http"

    def dataset_of(self, method: str, target: str) -> str | None:
        """The dataset a request belongs to, or None if it cannot be routed."""
        try:
            return self.router.match(method, target.split("?", 1)[0]).dataset
        except RouteError:
            return None

    async def handle(self, request: Request, out: Responder) -> None:
        raw_path = request.target.split("?", 1)[0]
        try:
            match = self.router.match(request.method, raw_path)
        except RouteError as exc:
            return await error(out, exc.status, exc.code, str(exc), None)
        row = self.view.get(match.dataset)
        if row is None:
            return await error(
                out,
                503,
                "stage_missing",
                f"no stage is recorded for dataset {match.dataset!r}: an operator must run "
                "`bascule migrate`; bascule never guesses a stage",
                match.dataset,
            )
        if match.kind == "write" and match.route is None and self.view.any_past_source():
            # An unrouted write could touch any dataset's records on the backend: once any
            # dataset is past `source` it could not be journaled safely.
            return await error(
                out,
                409,
                "unrouted_write",
                "this write matches no configured route, and datasets are past 'source': "
                "it could not be journaled safely, so it is refused",
                match.dataset,
            )
        if match.kind == "write" and self.dual is not None:
            # The journaled answer is read back (replay_as, the resolver): ask for it as is,
            # never content-coded. HTTP lets the answer go to the researcher uncoded.
            headers = [
                (k, v) for k, v in self.request_headers(request) if k.lower() != "accept-encoding"
            ]
            return await self.dual.write(request, out, match, headers)
        planned = plan(row.stage, match.kind)
        if planned.replicate is not None:
            if self.dual is None:
                return await error(
                    out,
                    503,
                    "journal_unavailable",
                    f"dataset {match.dataset!r} is in a dual-write stage but this replica has no "
                    "journal (BASCULE_JOURNAL_KEY and BASCULE_HMAC_KEY are needed): refused",
                    match.dataset,
                )
        await self.forward(request, out, match, self.upstreams[planned.serve])

    async def forward(
        self, request: Request, out: Responder, match: Match, upstream: Upstream
    ) -> None:
        headers = self.request_headers(request)
        try:
            async with upstream.request(
                request.method, request.target, headers, request.body
            ) as resp:
                if request.method == "HEAD" or resp.status == 304:
                    # The backend's Content-Length describes the body it did not send: keep it.
                    await resp.read()
                    await out.send(
                        resp.status, without(resp.raw_headers, HOP_BY_HOP), b"", keep_length=True
                    )
                    return
                out_headers = response_headers(resp.raw_headers)
                length = resp.content_length
                if length is not None and length <= STREAM_ABOVE:
                    await out.send(resp.status, out_headers, await resp.read())
                    return
                await out.start(resp.status, out_headers, length)
                async for chunk in resp.iter_chunks():
                    await out.write(chunk)
                await out.end()
        except UpstreamError as exc:
            if out.started:
                raise  # headers are gone already: the server breaks the connection
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
            await error(out, status, code, str(exc), match.dataset)

    def request_headers(self, request: Request) -> list[tuple[str, str]]:
        """End-to-end headers of the researcher's request, plus ``X-Forwarded-*``."""
        connection = request.header("Connection")
        drop = dropped(connection, _REQUEST_DROP)
        prior = None
        headers = []
        for name, value in request.headers:
            lower = name.lower()
            if lower in drop or lower.startswith("x-bascule-"):
                continue
            if lower == "idempotency-key" and value.startswith("bascule:"):
                continue  # bascule's own keys (its replays): a researcher cannot borrow one
            if lower == "x-forwarded-for":
                prior = value if prior is None else f"{prior}, {value}"
                continue
            headers.append((name, value))
        peer = request.remote
        headers.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
        headers.append(("X-Forwarded-Proto", self.scheme))
        headers.append(("X-Forwarded-Host", request.host))
        return headers
