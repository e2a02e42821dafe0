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
from typing import Literal

from multidict import CIMultiDict

from bascule.errors import RouteError, UpstreamError
from bascule.sealing import DATASET_WIDE, Namer
from bascule.stages import Side
from bascule.state.fleet import StageView
from bascule.upstream import Upstream
from proxy.answers import HOP_BY_HOP, dropped, error, response_headers, without
from proxy.dualwrite import DualWriter
from proxy.plan import Plan, plan
from proxy.routing import Match, Router
from proxy.server import Request, Responder
from shadow.compare import Answer
from shadow.dispatch import DECODABLE, Job, Shadows, unavailable
from shadow.ledger import Outcome

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
    shadow: Shadows | None = None
    """Shadow reads (``shadow/dispatch.py``, or the link to their worker process); None: this
    replica shadows nothing."""
    namer: Namer | None = None
    """Names the record a shadowed read depends on, for its race guard."""

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
        if (
            planned.shadow is not None
            and self.shadow is not None
            and match.route is not None  # only routes declared `read` are ever shadowed
            and request.method != "HEAD"
            and request.header("Range") is None  # a part is not the answer the other side gives
            and self.shadow.wanted(match.dataset)
        ):
            return await self.forward_shadowed(request, out, match, planned, row.version)
        await self.forward(request, out, match, self.upstreams[planned.serve])

    async def forward_shadowed(
        self, request: Request, out: Responder, match: Match, planned: Plan, version: int
    ) -> None:
        """Serve a read, keep its answer, and hand both to the shadow dispatcher once the
        researcher has it. The researcher keeps their compression, limited to codings the
        dispatcher can undo (gzip, deflate): it compares what the answers say, not their bytes
        on the wire. ``version``: the dataset's stage version the read is served under (the
        gate counts each stage's evidence apart)."""
        assert self.shadow is not None and planned.shadow is not None
        room = self.shadow.room()
        if room < STREAM_ABOVE:  # the shadow reads' memory budget is spent: don't even keep it
            self.shadow.count(match.dataset, match.template, "dropped", version)
            await self.forward(request, out, match, self.upstreams[planned.serve])
            return
        headers = [
            (k, decodable(v) if k.lower() == "accept-encoding" else v)
            for k, v in self.request_headers(request)
        ]
        t0 = self.shadow.now()
        limit = min(self.shadow.settings.max_body_bytes, room)
        answer = await self.forward(
            request,
            out,
            match,
            self.upstreams[planned.serve],
            headers=headers,
            capture=limit,
        )
        if answer is None:
            return
        if answer is False:
            too_large = limit == self.shadow.settings.max_body_bytes
            outcome: Outcome = "skipped_large" if too_large else "dropped"
            self.shadow.count(match.dataset, match.template, outcome, version)
            return
        if unavailable(answer.status):  # nothing to compare: the serving side could not answer
            self.shadow.count(match.dataset, match.template, "skipped_unavailable", version)
            return
        records = (
            None
            if match.key is None or self.namer is None
            else (self.namer.record(match.dataset, match.key), DATASET_WIDE)
        )
        self.shadow.submit(
            Job(
                dataset=match.dataset,
                route=match.template,
                method=request.method,
                target=request.target,
                headers=headers,
                body=request.body,
                serving=planned.serve,
                shadowed=planned.shadow,
                answer=answer,
                t0=t0,
                records=records,
                traceparent=request.header("traceparent"),
                version=version,
            )
        )

    async def forward(
        self,
        request: Request,
        out: Responder,
        match: Match,
        upstream: Upstream,
        *,
        headers: list[tuple[str, str]] | None = None,
        capture: int = 0,
    ) -> Answer | Literal[False] | None:
        """Forward a request and stream the answer back. ``capture``: also keep an answer of up
        to that many bytes and return it (False when larger; None when there is no backend
        answer to keep)."""
        if headers is None:
            headers = self.request_headers(request)
        try:
            async with upstream.request(
                request.method, request.target, headers, request.body, route=match.route
            ) as resp:
                if request.method == "HEAD" or resp.status == 304:
                    # The backend's Content-Length describes the body it did not send: keep it.
                    await resp.read()
                    await out.send(
                        resp.status, without(resp.raw_headers, HOP_BY_HOP), b"", keep_length=True
                    )
                    return None
                out_headers = response_headers(resp.raw_headers)
                length = resp.content_length
                if length is not None and length <= STREAM_ABOVE:
                    body = await resp.read()
                    await out.send(resp.status, out_headers, body)
                    if not capture:
                        return None
                    return Answer(resp.status, CIMultiDict(resp.raw_headers), body)
                kept: list[bytes] | None = (
                    [] if capture and (length is None or length <= capture) else None
                )
                size = 0
                await out.start(resp.status, out_headers, length)
                async for chunk in resp.iter_chunks():
                    await out.write(chunk)
                    if kept is not None:
                        size += len(chunk)
                        kept = kept if size <= capture else None
                        if kept is not None:
                            kept.append(chunk)
                await out.end()
                if not capture:
                    return None
                if kept is None:
                    return False
                return Answer(resp.status, CIMultiDict(resp.raw_headers), b"".join(kept))
        except UpstreamError as exc:
            if out.started:
                raise  # headers are gone already: the server breaks the connection
            log.warning(
                "%s %s dataset=%s backend=%s: %s",
                request.method,
                match.template,
                match.dataset,
                upstream.name,
                exc.code,
            )
            await error(out, exc.status, exc.code, str(exc), match.dataset)
            return None

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


def decodable(accept_encoding: str) -> str:
    """The codings of an ``Accept-Encoding`` the shadow dispatcher can undo (gzip, deflate),
    with their weights; ``identity`` when none is left (an empty or absent header would let
    the backend choose any coding)."""
    kept = [
        part.strip()
        for part in accept_encoding.split(",")
        if part.split(";", 1)[0].strip().lower() in DECODABLE
    ]
    return ", ".join(kept) or "identity"
