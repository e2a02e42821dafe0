"""The outermost layer: every answer gets its headers, every failure a JSON body, one log line.

Log lines carry the method, the route template and the status, never the URL, a query string
or a body: record ids and values are health data.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import traceback

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from refapi.errors import (
    ApiError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from refapi.responses import error_response
from refapi.state import RECEIVED, Received

_access = logging.getLogger("refapi.access")
_errors = logging.getLogger("refapi.errors")

# Failures of the database itself, as opposed to a bad request: the client may retry later.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, statement timeout
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
)


def route_template(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "(no route)"


def envelope(name: str, max_body: int) -> Middleware:
    @web.middleware
    async def handle(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        request.app[RECEIVED].append(
            Received(
                request.method,
                route_template(request),
                request.headers.get("traceparent"),
                "X-Bascule-Shadow" in request.headers,
            )
        )
        try:
            response = await handler(request)
        except ApiError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            response = _from_http_exception(exc, request, max_body)
        except asyncio.CancelledError:
            raise
        except _UNAVAILABLE as exc:
            _errors.warning(
                "database unavailable: %s on %s %s",
                type(exc).__name__,
                request.method,
                route_template(request),
            )
            response = error_response(
                ServiceUnavailable("database_unavailable", "the database cannot be reached")
            )
        except Exception as exc:
            # Where it failed (files, lines, functions) but not the exception's message, which
            # may quote a row (Postgres' do), nor source lines.
            _errors.error(
                "unhandled %s on %s %s at %s",
                type(exc).__name__,
                request.method,
                route_template(request),
                " <- ".join(
                    f"{f.filename}:{f.lineno} {f.name}"
                    for f in reversed(traceback.extract_tb(exc.__traceback__))
                ),
            )
            response = error_response(
                ApiError("internal_error", "the server failed; the request was logged")
            )
        response.headers["X-Request-Id"] = secrets.token_hex(16)
        response.headers["X-Served-By"] = name
        _access.info(
            "%s %s %d %.1fms",
            request.method,
            route_template(request),
            response.status,
            (time.perf_counter() - started) * 1000,
        )
        return response

    return handle


def _from_http_exception(
    exc: web.HTTPException, request: web.Request, max_body: int
) -> web.Response:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        error: ApiError = PayloadTooLarge(
            "body_too_large", f"request body is larger than {max_body} bytes"
        )
    elif isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        error = MethodNotAllowed(
            "method_not_allowed",
            f"{request.method} is not allowed here; allowed: {allowed}",
            {"Allow": allowed},
        )
    elif exc.status == 404:
        error = NotFound("not_found", "no such endpoint; GET /v1/datasets lists the datasets")
    else:
        error = ApiError(f"http_{exc.status}", exc.reason)
        error.status = exc.status
    return error_response(error)
