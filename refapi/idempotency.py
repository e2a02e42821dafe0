"""Idempotency keys: a write sent twice under one ``Idempotency-Key`` is applied once.

The first successful answer is stored in the same transaction as the write it answers, so there
is no moment where the write is applied but the key not recorded. A repeat gets that answer
back (same status, same body) with ``Idempotency-Replayed: true``; the key reused for another
method, path or body is refused (422). Errors are not stored: a request that failed changed
nothing, so it may be corrected and sent again under the same key.

Keys are not scoped to the caller's token: a proxy that resolves an in-doubt write re-sends it
with the same key under its own service token, and must get the first answer back.

One round trip: a keyed write records its key and its answer in the write's own statement
(``refapi/store.py``), the answer as the record written and its ``served_at``, from which a
repeat renders the same bytes again. A second request with the key waits there for the first
to commit, then finds its answer. A write without a key (or with keys ignored) is one
statement too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from refapi.datasets import DATASETS
from refapi.errors import BadRequest, ServiceUnavailable, Unprocessable
from refapi.records import rendered
from refapi.responses import Answer, served_at
from refapi.state import POOL, SETTINGS
from refapi.store import IDEMPOTENCY_TABLE, Claim, Conn, KeyTaken

HEADER = "Idempotency-Key"
REPLAYED = "Idempotency-Replayed"
MAX_KEY_LENGTH = 255

Action = Callable[[Conn, Claim | None], Awaitable[Answer]]
"""A write of one statement, recording its key and answer when given (``refapi/store.py``)."""


def fingerprint(request: web.Request, body: bytes) -> bytes:
    h = hashlib.sha256()
    for part in (request.method.encode(), request.raw_path.encode(), body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


async def perform(request: web.Request, dataset: str, body: bytes, action: Action) -> web.Response:
    """Run ``action``, honouring the request's idempotency key if any."""
    key = request.headers.get(HEADER)
    honour = request.app[SETTINGS].honour_idempotency
    if key is not None and honour and not 0 < len(key) <= MAX_KEY_LENGTH:
        raise BadRequest(
            "invalid_idempotency_key", f"{HEADER}: must be 1 to {MAX_KEY_LENGTH} characters"
        )
    async with request.app[POOL].acquire() as conn:
        if key is None or not honour:
            return (await action(conn, None)).response()
        claim = Claim(key, dataset, fingerprint(request, body), served_at())
        for _ in range(3):
            try:
                return (await action(conn, claim)).response()
            except KeyTaken:
                stored = await conn.fetchrow(
                    f"SELECT dataset, fingerprint, status, body, record, served_at"
                    f" FROM {IDEMPOTENCY_TABLE} WHERE key = $1",
                    key,
                )
            if stored is None:
                continue  # forgotten meanwhile (a reseed): this write may go after all
            if stored["fingerprint"] != claim.fingerprint:
                raise Unprocessable(
                    "idempotency_key_reused",
                    f"{HEADER}: already used for a different method, path or body",
                )
            return _stored_answer(stored).response({REPLAYED: "true"})
    raise ServiceUnavailable("database_unavailable", f"{HEADER}: could not be recorded; try again")


def _stored_answer(stored: Mapping[str, Any]) -> Answer:
    """The first answer, byte for byte: as sent, or rendered again from the record written."""
    if stored["record"] is None:
        return Answer(stored["status"], stored["body"])
    spec = DATASETS[stored["dataset"]]
    record = rendered(spec, stored["record"])
    return Answer.json(stored["status"], {"record": record}, stored["served_at"])
