"""The admin HTTP API, on its own port: the CLI's operations over HTTP, plus health and readiness.

``/healthz`` and ``/readyz`` are open (load balancers and probes call them; they carry no
record data). Everything under ``/v1`` needs ``Authorization: Bearer``: the viewer or the
operator token to read, the operator token to change anything. A missing or unknown token is
401, a viewer token on a change is 403, and in both cases nothing changes.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from bascule import checks
from bascule.checks import check_name, check_text
from bascule.errors import (
    BasculeError,
    Refused,
    StoreError,
    UnknownDataset,
    UnknownProposal,
    UnknownStage,
    UsageError,
)
from bascule.stages import GapOpen, Side, Stage
from bascule.state import replicas
from bascule.state.fleet import StageView
from bascule.state.journal import queries
from bascule.state.journal.entries import IllegalTransition
from bascule.state.stage_store import StageStore
from cutover import controller
from cutover.controller import Announcer
from cutover.switch import Switcher
from shadow import ledger
from shadow.noise_store import NoiseStore, pairs_needed

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class AdminDeps:
    store: StageStore
    announcer: Announcer
    view: StageView | None
    operator_tokens: Mapping[str, str]
    """Operator tokens by name: the name is recorded in the audit as who made a change."""
    viewer_token: str | None
    switcher: Switcher | None = None
    """Takes the write fence for changes that alter writes; None only in tests of the rules."""
    noise: NoiseStore | None = None
    """Noise proposals and decisions; None: the noise endpoints answer 503."""
    noise_pairs: Mapping[str, int] = field(default_factory=dict)
    """Each configured dataset's ``noise_pairs`` (:func:`shadow.noise.noise_pairs`)."""


DEPS = web.AppKey("admin_deps", AdminDeps)
IDENTITY = web.RequestKey("identity", str)  # who the token says the caller is


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def json_error(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status)


def _token_role(deps: AdminDeps, header: str | None) -> tuple[str, str] | None:
    """(role, identity) of the bearer token, or None."""
    if not header or not header.startswith("Bearer "):
        return None
    try:
        token = header[len("Bearer ") :].encode("latin-1")
    except UnicodeEncodeError:
        return None
    found = None
    # Compare with every token (constant time each) rather than stopping at the first match.
    for name, operator in deps.operator_tokens.items():
        if hmac.compare_digest(token, operator.encode("latin-1")) and found is None:
            found = ("operator", name)
    if deps.viewer_token and hmac.compare_digest(token, deps.viewer_token.encode("latin-1")):
        found = found or ("viewer", "viewer")
    return found


def _requires(role: str) -> Callable[[Handler], Handler]:
    def wrap(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            deps = request.app[DEPS]
            have = _token_role(deps, request.headers.get("Authorization"))
            if have is None:
                resp = json_error(401, "unauthorized", "a valid Bearer token is required")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="bascule-admin"'
                return resp
            if role == "operator" and have[0] != "operator":
                return json_error(403, "forbidden", "this change needs the operator token")
            request[IDENTITY] = have[1]
            return await handler(request)

        return guarded

    return wrap


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    view = request.app[DEPS].view
    if view is None:
        return json_response({"ready": True})
    detail = view.detail()
    return json_response(detail, 200 if detail["ready"] else 503)


@_requires("viewer")
async def list_datasets(request: web.Request) -> web.Response:
    store = request.app[DEPS].store
    rows = await store.all()
    counts = await queries.backlog(store.pool)
    return json_response(
        {
            "datasets": [
                {**rows[n].as_json(), **counts.get(n, queries.EMPTY_BACKLOG)} for n in sorted(rows)
            ]
        }
    )


def _dataset_and_limit(request: web.Request) -> tuple[str | None, int]:
    """The ``dataset`` (checked) and ``limit`` (1..1000) of a listing's query string;
    ValueError names what is wrong."""
    dataset = request.query.get("dataset")
    limit = int(request.query.get("limit", "100"))
    if dataset is not None:
        check_name(dataset)
    return dataset, max(1, min(limit, 1000))


@_requires("viewer")
async def history(request: web.Request) -> web.Response:
    try:
        dataset, limit = _dataset_and_limit(request)
    except ValueError as exc:
        return json_error(400, "bad_request", str(exc) or "limit must be a whole number")
    rows = await request.app[DEPS].store.history(dataset, limit)
    return json_response({"history": [r.as_json() for r in rows]})


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        raise UsageError("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise UsageError("the body must be a JSON object")
    return body


def _text(body: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = body.get(key, default)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{key!r} must be a string")
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise UsageError(f"{key!r} must be true or false")
    return value


def _only(body: dict[str, Any], *keys: str) -> None:
    """Refuse fields this endpoint does not know: a misspelt ``dry_run`` must never turn a
    dry run into a real change."""
    unknown = sorted(set(body) - set(keys))
    if unknown:
        raise UsageError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(keys)}"
        )


@_requires("operator")
async def change_stage(request: web.Request) -> web.Response:
    return await _change(request, rollback=False)


@_requires("operator")
async def rollback(request: web.Request) -> web.Response:
    return await _change(request, rollback=True)


async def _change(request: web.Request, *, rollback: bool) -> web.Response:
    deps = request.app[DEPS]
    dataset = request.match_info["dataset"]
    identity: str = request[IDENTITY]
    try:
        check_name(dataset)
        body = await _body(request)
        stage_key = "to" if rollback else "stage"
        _only(body, stage_key, "by", "reason", "force", "dry_run")
        force, dry_run = _flag(body, "force"), _flag(body, "dry_run")
        reason = _text(body, "reason")
        details = _on_behalf(body, identity)
        stage_text = _text(body, stage_key)
        if rollback:
            to = Stage.parse(stage_text) if stage_text else None
            result = await controller.rollback(
                deps.store,
                deps.announcer,
                dataset,
                to=to,
                actor=identity,
                reason=reason,
                details=details,
                force=force,
                dry_run=dry_run,
                switcher=deps.switcher,
            )
        else:
            if not stage_text:
                raise UsageError("'stage' is required")
            result = await controller.move(
                deps.store,
                deps.announcer,
                dataset,
                Stage.parse(stage_text),
                actor=identity,
                reason=reason,
                details=details,
                force=force,
                dry_run=dry_run,
                switcher=deps.switcher,
            )
    except BasculeError as exc:
        return _refusal(exc)
    if result.dry_run and not result.allowed:
        # As a real move would be: 409, with what the dry run found.
        payload = {"error": {"code": "refused", "message": result.refusal}}
        return json_response({**payload, "dry_run": result.as_json()}, 409)
    return json_response(result.as_json())


def _on_behalf(body: dict[str, Any], identity: str) -> dict[str, str]:
    """The audit's details: the token names who; a name the caller typed is kept apart."""
    details = {"via": "admin-api"}
    on_behalf_of = _text(body, "by")
    if on_behalf_of and on_behalf_of != identity:
        details["on_behalf_of"] = check_text("by", on_behalf_of)
    return details


def _refusal(exc: BasculeError) -> web.Response:
    """The answer to a change that did not happen; anything else is raised again."""
    if isinstance(exc, UnknownDataset):
        return json_error(404, "unknown_dataset", str(exc))
    if isinstance(exc, UnknownProposal):
        return json_error(404, "unknown_proposal", str(exc))
    if isinstance(exc, UnknownStage):
        return json_error(400, "unknown_stage", str(exc))
    if isinstance(exc, GapOpen):
        return json_error(409, "gap_open", str(exc))
    if isinstance(exc, Refused):
        return json_error(409, "refused", str(exc))
    if isinstance(exc, UsageError):
        return json_error(400, "bad_request", str(exc))
    if isinstance(exc, StoreError):
        return json_error(503, "state_unavailable", f"nothing was changed: {exc}")
    raise exc


@_requires("operator")
async def close_gap(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    dataset = request.match_info["dataset"]
    identity: str = request[IDENTITY]
    try:
        check_name(dataset)
        side = Side.parse(request.match_info["side"])
        body = await _body(request)
        _only(body, "by", "reason")
        closed = await controller.close_gap(
            deps.store,
            dataset,
            side,
            actor=identity,
            reason=_text(body, "reason"),
            details=_on_behalf(body, identity),
        )
    except BasculeError as exc:
        return _refusal(exc)
    return json_response(closed.as_json())


_LISTED_STATES = {
    "pending": "pending",
    "dead": "dead",
    "in-doubt": "in_doubt",
    "in_doubt": "in_doubt",
    "intent": "intent",
}


@_requires("viewer")
async def journal_status(request: web.Request) -> web.Response:
    store = request.app[DEPS].store
    counts = await queries.backlog(store.pool)
    names = sorted(await store.names())
    return json_response(
        {"journal": [{"dataset": n, **counts.get(n, queries.EMPTY_BACKLOG)} for n in names]}
    )


@_requires("viewer")
async def journal_entries(request: web.Request) -> web.Response:
    state = _LISTED_STATES.get(request.query.get("state", ""))
    if state is None:
        return json_error(
            400, "bad_request", "state must be one of pending, dead, in-doubt, intent"
        )
    try:
        dataset, limit = _dataset_and_limit(request)
    except ValueError as exc:
        return json_error(400, "bad_request", str(exc) or "limit must be a whole number")
    rows = await queries.listing(request.app[DEPS].store.pool, state, dataset, limit)
    return json_response({"entries": rows})


@_requires("operator")
async def journal_retry(request: web.Request) -> web.Response:
    try:
        body = await _body(request)
        seq, all_dead = body.get("seq"), body.get("all_dead", False)
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
            raise UsageError("'seq' must be a whole number")
        if not isinstance(all_dead, bool) or (seq is None) == (not all_dead):
            raise UsageError("name one entry ('seq') or set 'all_dead': true")
    except UsageError as exc:
        return json_error(400, "bad_request", str(exc))
    try:
        count = await queries.retry(request.app[DEPS].store.pool, seq, all_dead=all_dead)
    except StoreError as exc:
        return json_error(503, "state_unavailable", f"nothing was changed: {exc}")
    if seq is not None and count == 0:
        return json_error(409, "refused", f"journal entry {seq} does not exist or is not dead")
    return json_response({"retried": count})


@_requires("operator")
async def journal_skip(request: web.Request) -> web.Response:
    identity: str = request[IDENTITY]
    raw_seq = request.match_info["seq"]
    if not raw_seq.isdigit():
        return json_error(400, "bad_request", "the journal entry must be a whole number")
    seq = int(raw_seq)
    try:
        body = await _body(request)
        reason = checks.require_reason(_text(body, "reason"))
        on_behalf_of = _text(body, "by")
        details = {"via": "admin-api"}
        if on_behalf_of and on_behalf_of != identity:
            details["on_behalf_of"] = check_text("by", on_behalf_of)
        dataset = await queries.skip(
            request.app[DEPS].store.pool, seq, actor=identity, reason=reason, details=details
        )
    except ValueError as exc:  # UsageError is one
        return json_error(400, "bad_request", str(exc))
    except Refused as exc:
        return json_error(409, "refused", str(exc))
    except IllegalTransition as exc:
        return json_error(409, "refused", str(exc))
    except StoreError as exc:
        return json_error(503, "state_unavailable", f"nothing was changed: {exc}")
    return json_response({"skipped": seq, "dataset": dataset})


@_requires("viewer")
async def divergence(request: web.Request) -> web.Response:
    dataset = request.match_info["dataset"]
    try:
        check_name(dataset)
        since = float(request.query.get("since", str(24 * 3600)))
        if not since > 0:
            raise ValueError("since must be a positive number of seconds")
    except ValueError as exc:
        return json_error(400, "bad_request", str(exc) or "since must be a number of seconds")
    store = request.app[DEPS].store
    try:
        await store.get(dataset)
    except UnknownDataset as exc:
        return json_error(404, "unknown_dataset", str(exc))
    start = datetime.now(UTC) - timedelta(seconds=since)
    rows = await ledger.divergence(store.pool, dataset, start)
    errored = await ledger.errored(store.pool, dataset, start)
    return json_response({"dataset": dataset, "divergence": rows, "errored": errored})


def _noise_of(deps: AdminDeps) -> NoiseStore:
    if deps.noise is None:
        raise StoreError("noise proposals are not available on this replica")
    return deps.noise


@_requires("viewer")
async def noise_proposals(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    dataset = request.match_info["dataset"]
    try:
        noise = _noise_of(deps)
        min_pairs = pairs_needed(deps.noise_pairs, dataset)
        rows = await noise.proposals(dataset, min_pairs)
    except BasculeError as exc:
        return _refusal(exc)
    return json_response({"dataset": dataset, "min_pairs": min_pairs, "proposals": rows})


@_requires("operator")
async def noise_decide(request: web.Request) -> web.Response:
    """``{"pointer", "decision": "accept"|"reject", "reason", "route"?, "by"?}``: audited under
    the token's name, like a stage change."""
    deps = request.app[DEPS]
    dataset = request.match_info["dataset"]
    identity: str = request[IDENTITY]
    try:
        noise = _noise_of(deps)
        min_pairs = pairs_needed(deps.noise_pairs, dataset)
        body = await _body(request)
        _only(body, "pointer", "decision", "reason", "route", "by")
        pointer = _text(body, "pointer")
        if not pointer:
            raise UsageError("'pointer' is required")
        decision = _text(body, "decision")
        if decision not in ("accept", "reject"):
            raise UsageError("'decision' must be 'accept' or 'reject'")
        result = await noise.decide(
            dataset,
            pointer,
            decision == "accept",
            _text(body, "reason"),
            identity,
            _text(body, "route"),
            min_pairs=min_pairs,
            details=_on_behalf(body, identity),
        )
    except BasculeError as exc:
        return _refusal(exc)
    return json_response(result)


@_requires("viewer")
async def list_replicas(request: web.Request) -> web.Response:
    listed = await replicas.listing(request.app[DEPS].store.pool)
    return json_response({"replicas": [r.as_json() for r in listed]})


def create_admin_app(deps: AdminDeps, *, client_max_size: int = 64 * 1024) -> web.Application:
    app = web.Application(client_max_size=client_max_size)
    app[DEPS] = deps
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/datasets", list_datasets)
    app.router.add_get("/v1/history", history)
    app.router.add_get("/v1/replicas", list_replicas)
    app.router.add_get("/v1/datasets/{dataset}/divergence", divergence)
    app.router.add_get("/v1/datasets/{dataset}/noise", noise_proposals)
    app.router.add_post("/v1/datasets/{dataset}/noise", noise_decide)
    app.router.add_post("/v1/datasets/{dataset}/stage", change_stage)
    app.router.add_post("/v1/datasets/{dataset}/rollback", rollback)
    app.router.add_post("/v1/datasets/{dataset}/gaps/{side}/close", close_gap)
    app.router.add_get("/v1/journal", journal_status)
    app.router.add_get("/v1/journal/entries", journal_entries)
    app.router.add_post("/v1/journal/retry", journal_retry)
    app.router.add_post("/v1/journal/{seq}/skip", journal_skip)
    return app
