"""Idempotency keys: a write sent twice under one ``Idempotency-Key`` is applied once.

The first successful answer is stored in the same transaction as the write it answers, so there
is no moment where the write is applied but the key not recorded. A repeat gets that answer
back (same status, same body) with ``Idempotency-Replayed: true``; the key reused for another
method, path or body is refused (422). Errors are not stored: a request that failed changed
nothing, so it may be corrected and sent again under the same key.

Keys are not scoped to the caller's token: a proxy that resolves an in-doubt write re-sends it
with the same key under its own service token, and must get the first answer back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

from aiohttp import web

from refapi.errors import BadRequest, Unprocessable
from refapi.responses import Answer
from refapi.schema import IDEMPOTENCY_TABLE
from refapi.state import POOL, SETTINGS
from refapi.store import Conn

HEADER = "Idempotency-Key"
REPLAYED = "Idempotency-Replayed"
MAX_KEY_LENGTH = 255

Action = Callable[[Conn], Awaitable[Answer]]


def fingerprint(request: web.Request, body: bytes) -> bytes:
    h = hashlib.sha256()
    for part in (request.method.encode(), request.raw_path.encode(), body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


async def perform(request: web.Request, dataset: str, body: bytes, action: Action) -> web.Response:
    """Run ``action`` in a transaction, honouring the request's idempotency key if any."""
    key = request.headers.get(HEADER)
    honour = request.app[SETTINGS].honour_idempotency
    if key is not None and honour and not 0 < len(key) <= MAX_KEY_LENGTH:
        raise BadRequest(
            "invalid_idempotency_key", f"{HEADER}: must be 1 to {MAX_KEY_LENGTH} characters"
        )
    async with request.app[POOL].acquire() as conn, conn.transaction():
        if key is None or not honour:
            return (await action(conn)).response()
        # Two requests with one key queue here, so the second sees the first's committed answer
        # instead of both applying the write. Colliding hashes only make unrelated keys queue.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key)
        digest = fingerprint(request, body)
        stored = await conn.fetchrow(
            f"SELECT fingerprint, status, body FROM {IDEMPOTENCY_TABLE} WHERE key = $1", key
        )
        if stored is not None:
            if stored["fingerprint"] != digest:
                raise Unprocessable(
                    "idempotency_key_reused",
                    f"{HEADER}: already used for a different method, path or body",
                )
            return Answer(stored["status"], stored["body"]).response({REPLAYED: "true"})
        answer = await action(conn)
        if 200 <= answer.status < 300:
            await conn.execute(
                f"INSERT INTO {IDEMPOTENCY_TABLE} (key, dataset, fingerprint, status, body) "
                "VALUES ($1, $2, $3, $4, $5)",
                key,
                dataset,
                digest,
                answer.status,
                answer.body,
            )
        return answer.response()
