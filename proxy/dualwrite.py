"""The write path: fence, lock, plan, intent, authoritative call, outcome, answer.

Every write, in every stage, takes its dataset's write fence (shared) and its record's lock on
a session of its own, and reads its plan from the stage under that fence: a replica whose view
of the stages is stale never writes under an old authority, and a change that alters writes
(taking the fence exclusively) waits for writes in flight. In a stage that writes one side only
that is all. For a write whose plan has a side to replicate to:

1. the intent is committed to the journal (sealed; never the researcher's ``Authorization``),
   without the request's body;
2. the authoritative side is called, and its answer read whole;
3. the outcome is recorded: a 2xx is *pending* (to be replayed), a non-retryable 4xx is
   *rejected* (never replayed), and a 5xx, a 408/429, a timeout or a broken connection after
   the request was sent is *in doubt* (the backend may have committed it); the body is
   journaled with a pending or in-doubt outcome only, so a write the authority refused (a
   client without credentials, say) leaves no body in the journal;
4. the researcher gets the authoritative side's answer.

If the intent cannot be committed the write is refused (503) before anything is sent: no
write is ever accepted unjournaled. If only the outcome cannot be recorded, the write did
happen: the researcher gets its answer, and the entry, left at *intent* with its writer's
session gone, is an orphan for the resolver. The handler is never cancelled by its client
hanging up (``proxy/server.py``), so a write once sent is finished and journaled.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

from bascule.config import Route
from bascule.errors import RecordBusy, RouteError, StoreError, UpstreamError, UpstreamTimeout
from bascule.sealing import Namer
from bascule.stages import Side, Stage
from bascule.state.fleet import StageView
from bascule.state.journal import Journal
from bascule.state.journal.entries import JOURNALED_STAGES, IllegalTransition, State
from bascule.state.journal.writes import WriteSession
from bascule.upstream import Upstream
from proxy.answers import error, response_headers
from proxy.plan import plan
from proxy.routing import Match, Router, json_pointer
from proxy.server import Request, Responder

log = logging.getLogger("bascule.dualwrite")

Answer = tuple[int, list[tuple[str, str]], bytes]
"""The authoritative side's status, end-to-end headers and body."""

# Never journaled: credentials of the researcher, and what only concerns one connection.
_NOT_JOURNALED = frozenset({"authorization", "cookie", "proxy-authorization"})
_RETRYABLE_4XX = frozenset({408, 425, 429})


def outcome_of(status: int) -> State:
    if 200 <= status < 300:
        return "pending"
    if 400 <= status < 500 and status not in _RETRYABLE_4XX:
        return "rejected"
    return "in_doubt"  # 5xx, 408, 429, 1xx/3xx: the backend may or may not have applied it


FAILPOINT = "BASCULE_FAILPOINT"
"""Fault injection for tests of the worst moments: ``kill-after-send:METHOD`` makes the process
kill itself (SIGKILL) once the authoritative side has answered such a write, before its
outcome is journaled; ``kill-after-intent:METHOD``, once its intent is committed, before
anything is sent. Never set in production."""


@dataclass
class DualWriter:
    journal: Journal
    namer: Namer
    upstreams: Mapping[Side, Upstream]
    kill_after_send: str | None = field(
        default_factory=lambda: _failpoint(os.environ.get(FAILPOINT, ""))
    )
    kill_after_intent: str | None = field(
        default_factory=lambda: _failpoint(os.environ.get(FAILPOINT, ""), "kill-after-intent")
    )
    view: StageView | None = None
    """This replica's view of the stages: refreshed before answering a write that found a
    newer stage under the fence, so the researcher's next read here goes to the side that
    now holds the write."""
    lock_wait: float = 10.0
    """Seconds a write waits in all for its dataset's fence and its record's lock; past it,
    503 ``record_busy`` (with ``Retry-After``) before reaching any backend."""
    credentials_header: str = "authorization"
    """``[proxy] credentials_header``: a write without it is anonymous."""
    require_credentials: bool = False
    """``[proxy] require_credentials``: refuse anonymous writes before the journal (401)."""
    anonymous_writes: int = 4
    """``[proxy] anonymous_writes``: anonymous writes in flight at once; more get 429."""
    _anonymous: int = field(default=0, init=False)
    """Anonymous writes in flight now."""
    router: Router | None = None
    """Routes the record a create made (its ``replay_as`` path), to name it as later writes to
    it are named: from its outcome on, the create waits for no write to another record."""

    async def write(
        self,
        request: Request,
        out: Responder,
        match: Match,
        headers: list[tuple[str, str]],
        *,
        only_at_source: bool = False,
    ) -> None:
        """Any write, in any stage: its plan is read under the dataset's fence, never from
        this replica's view of the stages (which may be stale). An anonymous write (no
        credentials) is refused before the journal when credentials are required, or when
        ``anonymous_writes`` of them are in flight already: a client without credentials may
        neither fill the journal nor hold the sessions and locks other writers need.
        ``only_at_source``: a write whose record bascule cannot name (``match.refused``):
        refused, before anything is journaled or sent, unless its dataset is at ``source``
        under the fence."""
        credentials = request.header(self.credentials_header)
        if credentials is not None and credentials.strip():
            return await self._write(request, out, match, headers, only_at_source)
        if self.require_credentials:
            return await error(
                out,
                401,
                "credentials_required",
                f"this write carries no credentials (the {self.credentials_header} header): "
                "refused before reaching any backend",
                match.dataset,
            )
        if self._anonymous >= self.anonymous_writes:
            return await error(
                out,
                429,
                "too_many_anonymous_writes",
                f"{self.anonymous_writes} writes without credentials (the "
                f"{self.credentials_header} header) are in flight on this replica already: "
                "refused before reaching any backend; try again",
                match.dataset,
                retry_after=1,
            )
        self._anonymous += 1
        try:
            await self._write(request, out, match, headers, only_at_source)
        finally:
            self._anonymous -= 1

    async def _write(
        self,
        request: Request,
        out: Responder,
        match: Match,
        headers: list[tuple[str, str]],
        only_at_source: bool,
    ) -> None:
        token = self.namer.record(match.dataset, match.key)
        body = b""

        def journaled(with_body: bool = False) -> dict[str, Any]:
            """The journaled request; the intent's without its body (None): whatever settles
            an entry whose outcome is lost reads its record back, never re-sends it."""
            if only_at_source:
                raise _unnameable(match)  # before the intent: nothing is journaled
            return {
                "method": request.method,
                "target": request.target,
                "key": match.key,
                "headers": [[k, v] for k, v in headers if k.lower() not in _NOT_JOURNALED],
                "body": base64.b64encode(body).decode("ascii") if with_body else None,
            }

        known = self.view.get(match.dataset) if self.view is not None else None
        if self.view is not None and self.view.stale:
            # This replica has not read the stages for `stale_after`: the state Postgres is
            # away, or its sessions are silent (a partition). A write could wait out every
            # timeout on a dead session before failing: say so now.
            await error(
                out,
                503,
                "journal_unavailable",
                f"this write was refused before reaching any backend: this replica has not read "
                f"the stages for {self.view.stale_after:g} s (the state Postgres is unreachable), "
                "so it cannot fence or journal writes; try again, or another replica",
                match.dataset,
            )
            return
        # Whole, before any lock: a slow client must not hold its record's lock while it sends.
        body = await request.read()
        answer: Answer | UpstreamError | None = None
        try:
            async with self.journal.begin(
                match.dataset,
                token,
                route=match.template,
                method=request.method,
                request=journaled,
                expect_journal=known is None or known.stage.value in JOURNALED_STAGES,
                wait=self.lock_wait,
            ) as (session, fenced):
                if only_at_source and fenced.stage != Stage.SOURCE.value:
                    raise _unnameable(match)  # `target`: not journaled, but past source
                upstream = self.upstreams[plan(Stage(fenced.stage), "write").serve]
                if fenced.seq is not None and self.kill_after_intent == request.method:
                    log.error("failpoint kill-after-intent: killing this process")
                    os.kill(os.getpid(), signal.SIGKILL)
                answer = await self._call_authority(request, upstream, headers, body, match.route)
                if fenced.seq is not None:
                    if self.kill_after_send == request.method:
                        log.error("failpoint kill-after-send: killing this process")
                        os.kill(os.getpid(), signal.SIGKILL)
                    await self._record(session, fenced.seq, answer, match, journaled)
        except RouteError as exc:  # only_at_source, and the stage was found past it
            await error(out, exc.status, exc.code, str(exc), match.dataset)
            return
        except RecordBusy as exc:
            await error(
                out,
                503,
                "record_busy",
                f"this write was refused before reaching any backend: {exc}; try again",
                match.dataset,
                retry_after=1,
            )
            return
        except StoreError as exc:
            if answer is not None:
                # The write was sent; only its outcome is missing: the entry is an orphan.
                log.error("journal outcome not recorded (%s); entry left for the resolver", exc)
            else:
                await error(
                    out,
                    503,
                    "journal_unavailable",
                    f"this write was refused before reaching any backend: its dataset's stage "
                    f"could not be read under the write fence, or the journal could not record "
                    f"it ({exc}); writes resume when the state Postgres is back",
                    match.dataset,
                )
                return
        except IllegalTransition:
            # The outcome was refused under another write epoch (the fence should make that
            # impossible): the write was sent, so its answer still goes back; the entry, left
            # at intent with its session ended, is an orphan for the resolver.
            log.error("journal outcome refused (write epoch moved); entry left for the resolver")
        assert answer is not None
        await self._catch_up(match.dataset, fenced.version)
        if isinstance(answer, UpstreamError):
            log.warning(
                "%s %s dataset=%s: the authoritative call failed, %s (%s); %s",
                request.method,
                match.template,
                match.dataset,
                answer.code,
                answer,
                "in doubt, left to the resolver" if answer.sent else "not sent, refused",
            )
            await error(out, answer.status, answer.code, str(answer), match.dataset)
            return
        status, answer_headers, body = answer
        await out.send(status, answer_headers, body)

    async def _catch_up(self, dataset: str, version: int) -> None:
        if self.view is None:
            return
        known = self.view.get(dataset)
        if known is None or known.version < version:
            await self.view.reload()

    async def _call_authority(
        self,
        request: Request,
        upstream: Upstream,
        headers: list[tuple[str, str]],
        body: bytes,
        route: Route | None,
    ) -> Answer | UpstreamError:
        # A hard deadline on the whole call (pool wait, connect, answer) besides the silence
        # allowed: the resolver counts on a write never being in flight past it (orphans).
        limits = upstream.limits(request.method, route)
        try:
            async with asyncio.timeout(limits.total):
                async with upstream.request(
                    request.method, request.target, headers, body, limits=limits, role="write"
                ) as resp:
                    body = await resp.read()
                    return resp.status, response_headers(resp.raw_headers), body
        except UpstreamError as exc:
            return exc
        except TimeoutError:
            return UpstreamTimeout(
                upstream.name, f"did not finish its answer within {limits.total:g} s"
            )

    async def _record(
        self,
        session: WriteSession,
        seq: int,
        answer: Answer | UpstreamError,
        match: Match,
        journaled: Callable[[bool], dict[str, Any]],
    ) -> None:
        if isinstance(answer, UpstreamError):
            # Not sent: nothing happened anywhere. Sent: it may have been applied.
            if answer.sent:
                await session.decide(seq, "in_doubt", fenced=True, request=journaled(True))
            else:
                await session.decide(seq, "rejected", fenced=True)
            return
        status, headers, body = answer
        state = outcome_of(status)
        if state == "pending" and _replayed(headers):
            # The backend recognised a repeated Idempotency-Key and answered its *first* answer
            # without applying anything: that old body must never be replayed (it would
            # overwrite later writes on the other side). Whether the first attempt reached the
            # other side is unknown here, so the resolver settles it from the current state.
            state = "in_doubt"
        stored = orjson.dumps({"status": status, "headers": headers, "body": b64(body)})
        record = self._created(match, body) if state == "pending" else None
        # Its body only if it may be replayed or re-sent: a refused write's never stays.
        request = journaled(True) if state != "rejected" else None
        await session.decide(
            seq,
            state,
            status=status,
            answer=stored,
            fenced=True,
            record=record,
            request=request,
        )

    def _created(self, match: Match, body: bytes) -> str | None:
        """The token of the record a create made, as a write to it will name it (None when
        the write named its record already, or the answer does not say it: the entry then
        stays dataset-wide, and every later write of the dataset waits for its replay)."""
        if self.router is None or match.key is not None or match.route is None:
            return None
        made = created_record(self.router, self.namer, match.dataset, match.route, body)
        return None if made is None else made.token


@dataclass(frozen=True, slots=True)
class Created:
    """The record a create made, named as later writes to it name it."""

    token: str
    path: str
    """Its path on either side (``replay_as``'s, with its id): where to read it back."""
    id: str
    """Its id, as the create's answer gave it (never stored in the clear)."""


def created_record(
    router: Router, namer: Namer, dataset: str, route: Route, answer: bytes
) -> Created | None:
    """The record a create on ``route`` made, from the authority's ``answer``: its id at
    ``create_id``, put into ``replay_as``'s path and routed. None when the route is no create
    or the answer does not name an id."""
    if route.create_id is None:
        return None
    try:
        value = json_pointer(orjson.loads(answer), route.create_id)
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    return record_named(router, namer, dataset, route, str(value))


def record_named(
    router: Router, namer: Namer, dataset: str, route: Route, record_id: str
) -> Created | None:
    """The record ``record_id`` made by a create on ``route``: routed through ``replay_as``'s
    path (so its key is made canonical as a later write to it would be). None if it does not
    route to a record of ``dataset``."""
    if route.replay_as is None or not record_id:
        return None
    method, _, template = route.replay_as.partition(" ")
    path = template.replace("{dataset}", quote(dataset, safe="")).replace(
        "{id}", quote(record_id, safe="")
    )
    try:
        made = router.match(method, path)
    except RouteError:
        return None
    if made.key is None or made.dataset != dataset:
        return None
    return Created(namer.record(made.dataset, made.key), path, record_id)


def _unnameable(match: Match) -> RouteError:
    refused = match.refused
    assert refused is not None
    return RouteError(
        refused.status,
        refused.code,
        f"{refused}, so bascule cannot name the record this write changes; dataset "
        f"{match.dataset!r} is past 'source', where every write is locked and journaled by its "
        "record: it is refused",
    )


def call_deadline(upstream: Upstream, route: Route | None = None) -> float:
    """The longest a write of ``route`` (an unrouted one: None) to ``upstream`` may be in
    flight: its ``total_timeout``, or the backend's ``write_timeout``."""
    return upstream.limits("POST", route).total


def write_deadline(upstreams: Iterable[Upstream], routes: Iterable[Route]) -> float:
    """The longest any write may be in flight, on any backend: what the journal waits for
    before it reads back a dead replica's write, or takes over a dead holder's replay lease."""
    write_routes = [None, *(r for r in routes if r.kind == "write")]
    return max(call_deadline(u, r) for u in upstreams for r in write_routes)


def _replayed(headers: list[tuple[str, str]]) -> bool:
    return any(
        k.lower() == "idempotency-replayed" and v.strip().lower() == "true" for k, v in headers
    )


def _failpoint(value: str, point: str = "kill-after-send") -> str | None:
    kind, _, method = value.partition(":")
    return method.upper() if kind == point and method else None


def b64(data: bytes) -> str:
    """Bytes as base64 text, as journal payloads store them."""
    return base64.b64encode(data).decode("ascii")
