"""The researcher-facing handler: route, plan, forward to the side that serves, stream back.

What reaches the backend is what the researcher sent — method, raw path, query string, body and
end-to-end headers (``Authorization`` included) — less hop-by-hop headers, plus
``X-Forwarded-For/Proto/Host``. Answers come back the same way, streamed when large.
Errors bascule itself produces are JSON, name the dataset, and carry ``X-Bascule-Error``.

bascule refuses only what it must lock and cannot: a write past ``source`` whose path or key it
cannot read one way. Every other request reaches the serving side byte for byte, ambiguous
paths included (``//``, encoded ``/``, ``;``, dot segments, keys the route's format does not
read): an ambiguous read is served by the side that serves every dataset the path could
belong to (refused, 400 ``ambiguous_path``, when they are served by different sides), and is
never shadowed. An absolute-form target is forwarded in origin form (its authority is the
host, RFC 9112 3.2.2); ``OPTIONS *`` as is. A read's body of known length over
``STREAM_ABOVE`` bytes is streamed to the backend, never held whole; a write's is read whole
(it is journaled, or held under its dataset's write fence for the write's life).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from multidict import CIMultiDict

from bascule import metrics, telemetry
from bascule.config import DEFAULT_DATASET
from bascule.errors import RouteError, UpstreamError
from bascule.http1 import Body, Streamed
from bascule.sealing import DATASET_WIDE, Namer
from bascule.stages import Side, Stage
from bascule.state.fleet import StageView
from bascule.upstream import Upstream
from proxy.answers import HOP_BY_HOP, dropped, error, response_headers, without
from proxy.dualwrite import DualWriter
from proxy.plan import Plan, plan
from proxy.routing import SAFE_METHODS, UNROUTED, Match, Router
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
    # The trace context is bascule's own on the way to a backend (its span's, or the
    # researcher's trace id with bascule's span id): added by the backend client.
    "traceparent",
    "tracestate",
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
            return self.router.match(method, origin_form(target)[0].split("?", 1)[0]).dataset
        except (RouteError, ValueError):
            return None

    async def handle(self, request: Request, out: Responder) -> None:
        """One researcher's request, traced (a server span named by its route template, or
        its ids alone when not sampled: ``bascule/telemetry.py``) and timed."""
        started = time.perf_counter()
        traced = telemetry.begin(request.method, request.header("traceparent"))
        error: str | None = None
        try:
            await self._handle(request, out, traced)
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            status = out.status if out.status and not out.aborted else 0
            telemetry.end(traced, status, error)
            m = metrics.current
            if m is not None:
                m.server.record(
                    time.perf_counter() - started,
                    (request.method, traced.route, status, m.dataset(traced.dataset)),
                )

    async def _handle(self, request: Request, out: Responder, traced: telemetry.Request) -> None:
        target, authority = origin_form(request.target)
        if request.method == "CONNECT" or not (target.startswith("/") or target == "*"):
            return await error(
                out,
                501,
                "not_implemented",
                "bascule forwards requests for resources: it opens no tunnel (CONNECT)",
                None,
            )
        if authority is not None:
            request.target, request.host = target, authority
        if target == "*":  # OPTIONS * (or any method): the server itself, unrouted
            kind: Literal["read", "write"] = "read" if request.method in SAFE_METHODS else "write"
            match = Match(DEFAULT_DATASET, kind, UNROUTED)
        else:
            try:
                match = self.router.route(request.method, target.split("?", 1)[0])
            except RouteError as exc:
                return await error(out, exc.status, exc.code, str(exc), None)
        row = self.view.get(match.dataset)
        telemetry.route(
            traced, match.template, match.dataset, row.stage.value if row is not None else None
        )
        if match.refused is not None:
            return await self.handle_ambiguous(request, out, match, match.refused)
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

    async def handle_ambiguous(
        self, request: Request, out: Responder, match: Match, refused: RouteError
    ) -> None:
        """A path (or key) a server could read more than one way. A read is served by the side
        that serves every dataset it could belong to; a write is forwarded only while none of
        them (for an unrouted one, no dataset at all) is past ``source``: past it, bascule
        would have to lock and journal a record it cannot name."""
        stages: dict[str, Stage] = {}
        for name in sorted(match.candidates | {match.dataset}):
            row = self.view.get(name)
            if row is None:
                return await error(
                    out,
                    503,
                    "stage_missing",
                    f"no stage is recorded for dataset {name!r}: an operator must run "
                    "`bascule migrate`; bascule never guesses a stage",
                    name,
                )
            stages[name] = row.stage
        if match.kind == "write":
            if match.route is None:
                past = self.view.any_past_source()
                which = "datasets are"
            else:
                past = stages[match.dataset] is not Stage.SOURCE
                which = f"dataset {match.dataset!r} is"
            if past:
                return await error(
                    out,
                    refused.status,
                    refused.code,
                    f"{refused}, so bascule cannot name the record this write changes; "
                    f"{which} past 'source', where every write is locked and journaled by its "
                    "record: it is refused",
                    match.dataset,
                )
            if self.dual is not None:
                headers = [
                    (k, v)
                    for k, v in self.request_headers(request)
                    if k.lower() != "accept-encoding"
                ]
                return await self.dual.write(request, out, match, headers, only_at_source=True)
            serve = plan(stages[match.dataset], "write").serve
            await self.forward(request, out, match, self.upstreams[serve])
            return None
        sides = {name: plan(stage, "read").serve for name, stage in stages.items()}
        if len(set(sides.values())) > 1:
            listing = ", ".join(
                f"{name} (served by the {side.value})" for name, side in sides.items()
            )
            return await error(
                out,
                400,
                "ambiguous_path",
                f"{refused}; a server could read this path as belonging to {listing}, so bascule "
                "cannot tell which side holds the answer: write the path plainly",
                match.dataset,
            )
        (serve,) = set(sides.values())
        await self.forward(request, out, match, self.upstreams[serve])

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
        body = await request.read()  # the shadow read sends it again
        t0 = self.shadow.now()
        limit = min(self.shadow.settings.max_body_bytes, room)
        answer = await self.forward(
            request,
            out,
            match,
            self.upstreams[planned.serve],
            headers=headers,
            capture=limit,
            body=body,
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
                body=body,
                serving=planned.serve,
                shadowed=planned.shadow,
                answer=answer,
                t0=t0,
                records=records,
                traceparent=telemetry.traceparent_now(),
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
        body: bytes | None = None,
    ) -> Answer | Literal[False] | None:
        """Forward a request and stream the answer back. ``capture``: also keep an answer of up
        to that many bytes and return it (False when larger; None when there is no backend
        answer to keep). ``body``: the request's, read already; else it is streamed when
        large (see :func:`body_of`)."""
        if headers is None:
            headers = self.request_headers(request)
        sent: Body = body if body is not None else await body_of(request)
        try:
            async with upstream.request(
                request.method, request.target, headers, sent, route=match.route
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
                # Its head is gone already: the researcher learns it from the connection cut
                # short. One line, no traceback; the route's template, never its path.
                log.warning(
                    "%s %s dataset=%s backend=%s: the answer broke off mid-stream (%s); the "
                    "researcher's connection was cut",
                    request.method,
                    match.template,
                    match.dataset,
                    upstream.name,
                    type(exc).__name__,
                )
                out.abort()
                return None
            # The error's text is about the connection (refused, timed out, a certificate
            # refused), never about a request's content.
            log.warning(
                "%s %s dataset=%s backend=%s: %s (%s)",
                request.method,
                match.template,
                match.dataset,
                upstream.name,
                exc.code,
                exc,
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


def origin_form(target: str) -> tuple[str, str | None]:
    """An absolute-form request target (``http://host/path?q``) as its origin form and its
    authority; any other target as is, with None."""
    scheme, sep, rest = target.partition("://")
    if not sep or not scheme.isalpha():
        return target, None
    ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
    end = min(ends, default=len(rest))
    authority, origin = rest[:end], rest[end:]
    return origin if origin.startswith("/") else "/" + origin, authority.rsplit("@", 1)[-1]


async def body_of(request: Request) -> Body:
    """What to send of a request's body: streamed when its length is known, over
    ``STREAM_ABOVE`` bytes and not all in yet; else the bytes (a small or chunked body, read
    whole up to the server's ``max_body_bytes``)."""
    length = request.length
    if length is not None and length > STREAM_ABOVE and not request.complete:
        return Streamed(length, request.stream())
    return await request.read()


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
