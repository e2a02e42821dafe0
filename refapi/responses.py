"""JSON in and out: request bodies parsed strictly, answers stamped with ``served_at``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from aiohttp import web

from refapi.columns import format_timestamp
from refapi.errors import ApiError, BadRequest

JSON = "application/json"


def served_at() -> str:
    return format_timestamp(datetime.now(UTC))


@dataclass(frozen=True)
class Answer:
    """A status and its encoded body, kept as bytes so an idempotent replay resends them exactly."""

    status: int
    body: bytes | None = None

    @classmethod
    def json(cls, status: int, payload: Mapping[str, object], at: str | None = None) -> Answer:
        """``payload`` with its ``served_at``: ``at``, or now."""
        return cls(status, orjson.dumps({**payload, "served_at": at or served_at()}))

    def response(self, headers: Mapping[str, str] | None = None) -> web.Response:
        if self.body is None:
            return web.Response(status=self.status, headers=headers)
        return web.Response(status=self.status, body=self.body, content_type=JSON, headers=headers)


def json_response(payload: Mapping[str, object], status: int = 200) -> web.Response:
    return Answer.json(status, payload).response()


def error_response(error: ApiError) -> web.Response:
    payload = {"error": {"code": error.code, "message": error.message}}
    return Answer.json(error.status, payload).response(error.headers)


async def read_object(request: web.Request) -> tuple[bytes, dict[str, object]]:
    """The raw body and the JSON object it holds; 400 if it is not one, 413 past the limit."""
    # The body is read whatever its Content-Type: clients that send JSON as
    # application/octet-stream are common, and refusing them would teach nothing.
    raw = await request.read()
    if not raw.strip():
        raise BadRequest("malformed_json", "request body is empty; a JSON object is expected")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            "malformed_json",
            f"request body is not valid JSON (line {exc.lineno}, column {exc.colno})",
        ) from None
    if not isinstance(payload, dict):
        kind = "an array" if isinstance(payload, list) else "a scalar"
        raise BadRequest("invalid_body", f"request body must be a JSON object, got {kind}")
    return raw, payload
