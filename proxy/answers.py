"""What bascule answers itself, and the header rules shared by every path to a backend."""

from __future__ import annotations

import orjson

from proxy.server import Responder

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
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


def response_headers(raw: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A backend's answer headers, less hop-by-hop ones and its framing."""
    return without(raw, _RESPONSE_DROP)


def without(raw: list[tuple[str, str]], always: frozenset[str]) -> list[tuple[str, str]]:
    connection = next((v for k, v in raw if k.lower() == "connection"), None)
    drop = dropped(connection, always)
    return [(k, v) for k, v in raw if k.lower() not in drop]


def dropped(connection: str | None, always: frozenset[str]) -> frozenset[str]:
    """Hop-by-hop names, with those the ``Connection`` header lists."""
    if not connection:
        return always
    return always | {t.strip().lower() for t in connection.split(",") if t.strip()}


async def error(
    out: Responder,
    status: int,
    code: str,
    message: str,
    dataset: str | None,
    *,
    retry_after: int | None = None,
) -> None:
    """bascule's own answer; ``retry_after``: seconds after which trying again may succeed
    (a busy record, a refusal that passes)."""
    payload: dict[str, object] = {"code": code, "message": message}
    if dataset is not None:
        payload["dataset"] = dataset
    headers = [("Content-Type", "application/json"), ("X-Bascule-Error", code)]
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    await out.send(status, headers, orjson.dumps({"error": payload}))
