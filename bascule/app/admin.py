"""The admin HTTP API, on its own port: the CLI's operations over HTTP, plus health and readiness.

``/healthz`` and ``/readyz`` are open (load balancers and probes call them; they carry no
record data). ``/metrics`` (Prometheus text) and everything under ``/v1`` need
``Authorization: Bearer``: the viewer or the operator token to read, the operator token to
change anything. A missing or unknown token is
401, a viewer token on a change is 403, and in both cases nothing changes.

The on-call page (``GET /``, its fragment ``/oncall/fragment`` and its JSON ``/api/oncall``:
``bascule/app/oncall.py``) only reads. It takes the bearer header too, or the session cookie a
person gets from ``POST /login`` with a token; that cookie opens nothing else.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from bascule import metrics
from bascule.app import oncall
from bascule.app.operations import Operations
from bascule.checks import check_name, check_seq, check_text
from bascule.errors import (
    BasculeError,
    Refused,
    StoreError,
    UnknownDataset,
    UnknownProposal,
    UnknownStage,
    UsageError,
)
from bascule.stages import GapOpen, Side
from bascule.state.fleet import StageView

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger("bascule.admin")


@dataclass(frozen=True)
class AdminDeps:
    ops: Operations
    """The operator commands (``bascule/app/operations.py``): the CLI runs the same."""
    view: StageView | None
    operator_tokens: Mapping[str, str]
    """Operator tokens by name: the name is recorded in the audit as who made a change."""
    viewer_token: str | None
    stopping: Callable[[], bool] = lambda: False
    """True once the replica is stopping (SIGTERM): ``/readyz`` answers 503 from then on."""


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
    # utf-8, never failing: a token no header can carry (refused at start) matches nothing.
    for name, operator in deps.operator_tokens.items():
        if hmac.compare_digest(token, operator.encode()) and found is None:
            found = ("operator", name)
    if deps.viewer_token and hmac.compare_digest(token, deps.viewer_token.encode()):
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


# --- the on-call page ------------------------------------------------------------------------

PAGE_HEADERS = {
    # Only bascule's own script, style sheet and fetches; no frame, no form elsewhere.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=body, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS
    )


def _readers(deps: AdminDeps) -> list[str]:
    """Every token that may read: the operators' and the viewer's."""
    tokens = list(deps.operator_tokens.values())
    if deps.viewer_token:
        tokens.append(deps.viewer_token)
    return tokens


def _may_read(request: web.Request) -> bool:
    """A reader's bearer header, or a live session cookie (from ``POST /login``)."""
    deps = request.app[DEPS]
    if _token_role(deps, request.headers.get("Authorization")) is not None:
        return True
    cookie = request.cookies.get(oncall.SESSION_COOKIE)
    return cookie is not None and oncall.session_matches(cookie, _readers(deps))


async def oncall_page(request: web.Request) -> web.Response:
    if not _may_read(request):
        return _html(oncall.login(), 401)
    try:
        data = await request.app[DEPS].ops.oncall()
    except BasculeError as exc:
        return _html(oncall.unavailable(str(exc)), 503)
    raw = request.query.get("refresh", str(oncall.REFRESH_SECONDS))
    refresh = int(raw) if raw.isdigit() and 1 <= int(raw) <= 3600 else oncall.REFRESH_SECONDS
    return _html(oncall.page(data, refresh))


async def oncall_fragment(request: web.Request) -> web.Response:
    """What the page's script puts in place every few seconds."""
    if not _may_read(request):
        return _html("<p>log in again</p>", 401)
    try:
        data = await request.app[DEPS].ops.oncall()
    except BasculeError as exc:
        return _html(oncall.failed(str(exc)), 503)
    return _html(oncall.fragment(data))


async def oncall_json(request: web.Request) -> web.Response:
    """The page's figures as JSON (for scripts; the same as the page shows)."""
    if not _may_read(request):
        return json_error(401, "unauthorized", "a valid Bearer token or session is required")
    return await _answer(lambda ops: ops.oncall(), request)


async def login_form(request: web.Request) -> web.Response:
    return _html(oncall.login())


async def login(request: web.Request) -> web.Response:
    """A token typed in the form, exchanged for a session cookie (never the token itself)."""
    origin = request.headers.get("Origin")
    if origin is not None and origin.split("://", 1)[-1] != request.host:
        return _html(oncall.login("log in from this page"), 403)
    form = await request.post()
    token = form.get("token")
    deps = request.app[DEPS]
    if (
        not isinstance(token, str)
        or not token
        or _token_role(deps, f"Bearer {token.strip()}") is None
    ):
        return _html(oncall.login("that token is not a viewer's or an operator's"), 401)
    resp = web.Response(status=303, headers={**PAGE_HEADERS, "Location": "/"})
    resp.set_cookie(
        oncall.SESSION_COOKIE,
        oncall.session_value(token.strip()),
        max_age=oncall.SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="Strict",
    )
    return resp


async def logout(request: web.Request) -> web.Response:
    resp = web.Response(status=303, headers={**PAGE_HEADERS, "Location": "/login"})
    resp.del_cookie(oncall.SESSION_COOKIE, path="/")
    return resp


async def oncall_script(request: web.Request) -> web.Response:
    return web.Response(
        text=oncall.SCRIPT, content_type="text/javascript", charset="utf-8", headers=PAGE_HEADERS
    )


async def oncall_style(request: web.Request) -> web.Response:
    return web.Response(
        text=oncall.STYLE, content_type="text/css", charset="utf-8", headers=PAGE_HEADERS
    )


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    stopping = deps.stopping()
    detail: dict[str, Any] = {"ready": True} if deps.view is None else deps.view.detail()
    if stopping:
        detail["ready"] = False
    detail["stopping"] = stopping
    return json_response(detail, 200 if detail["ready"] else 503)


@_requires("viewer")
async def prometheus(request: web.Request) -> web.Response:
    """Every metric (``bascule/metrics.py``) in Prometheus text format. The viewer's token,
    as every read here: the labels name datasets, routes and pointers (no value), and a
    scraper sends it (``authorization: credentials_file``). The gauges' figures are read from
    the state database, at most once a second; a failing read serves the last ones."""
    if metrics.now() - metrics.figures.at > 1.0:
        try:
            await request.app[DEPS].ops.refresh_figures()
        except (StoreError, OSError) as exc:
            log.warning("metrics: state figures not refreshed (%s)", type(exc).__name__)
    return web.Response(
        body=metrics.scrape(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


@_requires("viewer")
async def list_datasets(request: web.Request) -> web.Response:
    return await _answer(lambda ops: ops.datasets(), request, key="datasets")


@_requires("viewer")
async def history(request: web.Request) -> web.Response:
    dataset = request.query.get("dataset")
    return await _answer(
        lambda ops: ops.history(dataset, _int(request, "limit", 100)), request, key="history"
    )


@_requires("viewer")
async def list_replicas(request: web.Request) -> web.Response:
    return await _answer(lambda ops: ops.replicas(), request, key="replicas")


@_requires("viewer")
async def divergence(request: web.Request) -> web.Response:
    dataset = request.match_info["dataset"]
    return await _answer(
        lambda ops: ops.divergence(dataset, _float(request, "since", 24 * 3600.0)), request
    )


@_requires("viewer")
async def journal_status(request: web.Request) -> web.Response:
    async def rows(ops: Operations) -> list[dict[str, Any]]:
        return [{"dataset": n, **counts} for n, counts in (await ops.journal_status()).items()]

    return await _answer(rows, request, key="journal")


@_requires("viewer")
async def journal_entries(request: web.Request) -> web.Response:
    state = request.query.get("state", "")
    dataset = request.query.get("dataset")
    return await _answer(
        lambda ops: ops.journal_list(state, dataset, _int(request, "limit", 100)),
        request,
        key="entries",
    )


@_requires("operator")
async def auto_promote(request: web.Request) -> web.Response:
    identity: str = request[IDENTITY]
    dataset = request.match_info["dataset"]

    async def switch(ops: Operations) -> dict[str, Any]:
        body = await _body(request)
        _only(body, "on", "by", "reason")
        if "on" not in body:
            raise UsageError("'on' is required: true or false")
        on = _flag(body, "on")
        return await ops.auto_promote(
            dataset, on, identity, _text(body, "reason"), _on_behalf(body, identity)
        )

    return await _answer(switch, request)


@_requires("viewer")
async def gate(request: web.Request) -> web.Response:
    dataset = request.match_info["dataset"]
    return await _answer(lambda ops: ops.gate_report(dataset), request)


@_requires("viewer")
async def noise_proposals(request: web.Request) -> web.Response:
    dataset = request.match_info["dataset"]
    return await _answer(lambda ops: ops.noise(dataset), request)


@_requires("operator")
async def change_stage(request: web.Request) -> web.Response:
    return await _change(request, rollback=False)


@_requires("operator")
async def rollback(request: web.Request) -> web.Response:
    return await _change(request, rollback=True)


async def _change(request: web.Request, *, rollback: bool) -> web.Response:
    ops, identity = request.app[DEPS].ops, request[IDENTITY]
    dataset = request.match_info["dataset"]
    try:
        check_name(dataset)
        body = await _body(request)
        stage_key = "to" if rollback else "stage"
        _only(body, stage_key, "by", "reason", "force", "dry_run")
        force, dry_run = _flag(body, "force"), _flag(body, "dry_run")
        reason, stage = _text(body, "reason"), _text(body, stage_key)
        details = _on_behalf(body, identity)
        if rollback:
            result = await ops.rollback(
                dataset, stage, identity, reason, force=force, dry_run=dry_run, details=details
            )
        else:
            if not stage:
                raise UsageError("'stage' is required")
            result = await ops.stage(
                dataset, stage, identity, reason, force=force, dry_run=dry_run, details=details
            )
    except BasculeError as exc:
        return _refusal(exc)
    if result["dry_run"] and not result["allowed"]:
        # As a real move would be: 409, with what the dry run found.
        payload = {"error": {"code": "refused", "message": result["refusal"]}}
        return json_response({**payload, "dry_run": result}, 409)
    return json_response(result)


@_requires("operator")
async def close_gap(request: web.Request) -> web.Response:
    identity: str = request[IDENTITY]
    dataset, side = request.match_info["dataset"], request.match_info["side"]

    async def close(ops: Operations) -> dict[str, Any]:
        check_name(dataset)
        Side.parse(side)
        body = await _body(request)
        _only(body, "by", "reason")
        details = _on_behalf(body, identity)
        return await ops.gap_close(dataset, side, identity, _text(body, "reason"), details)

    return await _answer(close, request)


@_requires("operator")
async def journal_retry(request: web.Request) -> web.Response:
    async def retry(ops: Operations) -> dict[str, int]:
        body = await _body(request)
        _only(body, "seq", "all_dead", "by", "reason")
        seq, all_dead = body.get("seq"), body.get("all_dead", False)
        if seq is not None:
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise UsageError("'seq' must be a whole number")
            seq = check_seq(seq)
        if not isinstance(all_dead, bool):
            raise UsageError("'all_dead' must be true or false")
        identity: str = request[IDENTITY]
        retried = await ops.journal_retry(
            seq, all_dead, identity, _text(body, "reason"), _on_behalf(body, identity)
        )
        return {"retried": retried}

    return await _answer(retry, request)


@_requires("operator")
async def journal_skip(request: web.Request) -> web.Response:
    identity: str = request[IDENTITY]
    raw_seq = request.match_info["seq"]

    async def skip(ops: Operations) -> dict[str, Any]:
        seq = check_seq(raw_seq)
        body = await _body(request)
        _only(body, "by", "reason")
        dataset = await ops.journal_skip(
            seq, identity, _text(body, "reason"), _on_behalf(body, identity)
        )
        return {"skipped": seq, "dataset": dataset}

    return await _answer(skip, request)


@_requires("operator")
async def journal_resolve(request: web.Request) -> web.Response:
    """``{"as": "applied"|"not-applied", "record"?, "reason", "by"?}``: an SRE's word on an
    entry in doubt, audited under the token's name."""
    identity: str = request[IDENTITY]
    raw_seq = request.match_info["seq"]

    async def resolve(ops: Operations) -> dict[str, Any]:
        if not (raw_seq.isascii() and raw_seq.isdigit()) or len(raw_seq) > 19:
            raise UsageError("the journal entry must be a whole number from 1 to 2^63 - 1")
        body = await _body(request)
        _only(body, "as", "record", "by", "reason")
        return await ops.journal_resolve(
            int(raw_seq),
            _text(body, "as") or "",
            _text(body, "record"),
            identity,
            _text(body, "reason"),
            _on_behalf(body, identity),
        )

    return await _answer(resolve, request)


@_requires("operator")
async def noise_decide(request: web.Request) -> web.Response:
    """``{"pointer", "decision": "accept"|"reject", "reason", "route"?, "by"?}``: audited under
    the token's name, like a stage change."""
    identity: str = request[IDENTITY]
    dataset = request.match_info["dataset"]

    async def decide(ops: Operations) -> dict[str, Any]:
        body = await _body(request)
        _only(body, "pointer", "decision", "reason", "route", "by")
        pointer = _text(body, "pointer")
        if not pointer:
            raise UsageError("'pointer' is required")
        decision = _text(body, "decision")
        if decision not in ("accept", "reject"):
            raise UsageError("'decision' must be 'accept' or 'reject'")
        return await ops.noise_decide(
            dataset,
            pointer,
            decision == "accept",
            identity,
            _text(body, "reason"),
            _text(body, "route"),
            _on_behalf(body, identity),
        )

    return await _answer(decide, request)


async def _answer(
    call: Callable[[Operations], Awaitable[Any]], request: web.Request, *, key: str | None = None
) -> web.Response:
    """Run one operation; its answer as JSON (under ``key``), or its refusal as an error."""
    try:
        result = await call(request.app[DEPS].ops)
    except BasculeError as exc:
        return _refusal(exc)
    return json_response(result if key is None else {key: result})


def _int(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, str(default)))
    except ValueError:
        raise UsageError(f"{name} must be a whole number") from None


def _float(request: web.Request, name: str, default: float) -> float:
    try:
        return float(request.query.get(name, str(default)))
    except ValueError:
        raise UsageError(f"{name} must be a number of seconds") from None


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


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse at ERROR, with a traceback and the request line
    (which may carry identifiers). It is the client's mistake, answered 400: one WARNING line,
    naming neither the target nor the bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "a request that is not HTTP/1.1 refused (%s %s)"
            record.args = (exc.code, type(exc).__name__)
            record.exc_info, record.exc_text = None, None
        return True


_MALFORMED = _MalformedRequests()


def create_admin_app(deps: AdminDeps, *, client_max_size: int = 64 * 1024) -> web.Application:
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED)  # once: filters are a set
    app = web.Application(client_max_size=client_max_size)
    app[DEPS] = deps
    app.router.add_get("/", oncall_page)
    app.router.add_get("/oncall/fragment", oncall_fragment)
    app.router.add_get("/api/oncall", oncall_json)
    app.router.add_get("/oncall.js", oncall_script)
    app.router.add_get("/oncall.css", oncall_style)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/v1/datasets", list_datasets)
    app.router.add_get("/v1/history", history)
    app.router.add_get("/v1/replicas", list_replicas)
    app.router.add_get("/v1/datasets/{dataset}/divergence", divergence)
    app.router.add_get("/v1/datasets/{dataset}/gate", gate)
    app.router.add_post("/v1/datasets/{dataset}/auto-promote", auto_promote)
    app.router.add_get("/v1/datasets/{dataset}/noise", noise_proposals)
    app.router.add_post("/v1/datasets/{dataset}/noise", noise_decide)
    app.router.add_post("/v1/datasets/{dataset}/stage", change_stage)
    app.router.add_post("/v1/datasets/{dataset}/rollback", rollback)
    app.router.add_post("/v1/datasets/{dataset}/gaps/{side}/close", close_gap)
    app.router.add_get("/v1/journal", journal_status)
    app.router.add_get("/v1/journal/entries", journal_entries)
    app.router.add_post("/v1/journal/retry", journal_retry)
    app.router.add_post("/v1/journal/{seq}/skip", journal_skip)
    app.router.add_post("/v1/journal/{seq}/resolve", journal_resolve)
    return app
