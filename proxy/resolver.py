"""The resolver: settles writes whose fate is unknown, never by a blind re-send.

An entry is *in doubt* when the authoritative side answered 5xx, timed out or broke the
connection after the request was sent; an entry left at *intent* by a writer whose session
ended (the replica died) is an orphan, and is first marked in doubt. Either may or may not
have been applied. The resolver settles them by asking the authoritative side for the record's
current state, and queues the replay of that state: a PUT of what it holds (through the
record's ``replay_as`` route), or a DELETE if it holds nothing. Later writes to the record,
held back meanwhile, then replay on top, so both sides end with the authoritative state. A
write that names no record (a create whose answer was lost, a bulk write) cannot be read back
until its record is known: it stays in doubt, shown to SREs, blocking the gate, unless its
route declares ``idempotent_backend`` and the researcher sent it with an ``Idempotency-Key`` —
then it is re-sent to the authoritative side with that key (never an orphan: its answer is
unknown, and may have been a refusal the researcher was owed), which the backend answers
without applying it twice: the first answer if it had applied it, else it applies it now. That
is exactly what the researcher's own retry under that key would do. A write sent without a key
is never re-sent: had it not been applied, bascule would be creating what the researcher was
told had failed (and may have created again); an SRE who finds the record it made names it
(``bascule journal resolve SEQ applied --record ID``), or says it was not applied.

Once a create's record is known (the re-send's answer, or the SRE's word), the entry is named
after it and settled like a write naming its record: by its *current* state read back, never by
the create's first answer. A create in doubt does not hold back later writes naming their
record (``bascule/state/journal/replay.py``), so writes to the record it made may already have
been replayed: the first answer, replayed after them, would undo them on the other side.

An orphan is only read back once its writer's call to the backend could no longer be in
flight: the write path holds every call to a hard deadline (connect plus read timeout), and
the orphan must be older than that plus a margin, by the database's clock. A replica that
lost its state session but not its life may still be waiting for that answer until then. A
backend that applies a request after its client gave up on it can still defeat this; the
data verification catches what that leaves behind.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from bascule.config import Route
from bascule.errors import StoreError, UpstreamError
from bascule.sealing import Namer, SealError
from bascule.stages import Side
from bascule.state.journal import Journal
from bascule.state.journal.entries import Entry, IllegalTransition
from bascule.upstream import Upstream
from proxy.answers import response_headers
from proxy.dualwrite import (
    Created,
    b64,
    call_deadline,
    created_record,
    outcome_of,
    record_named,
    write_deadline,
)
from proxy.routing import Router, path_values

log = logging.getLogger("bascule.resolver")

ORPHANED = "orphan: its writer died before recording the answer"
"""The error of an in-doubt entry that was an orphan: what the backend answered is unknown."""

NAMED = "resolve"
"""The member of an in-doubt create's answer that names the record it made
(``{"resolve": {"id": ...}}``): written by ``bascule journal resolve SEQ applied --record``, or
by the resolver once a re-send's answer told it."""


@dataclass
class Resolver:
    journal: Journal
    upstreams: Mapping[Side, Upstream]
    routes: Mapping[tuple[str, str], Route]
    credentials: Mapping[Side, str | None]
    orphan_grace: float = 30.0
    """Seconds past a write's deadline before an orphan is read back (``[state] orphan_grace``)."""
    every: float = 0.5
    """Seconds between two looks at one dataset (the replayer calls often)."""
    router: Router | None = None
    namer: Namer | None = None
    """Name the record a create made, as later writes to it are named (with ``router``)."""
    _last: dict[str, float] = field(default_factory=dict)

    async def round(self, dataset: str) -> int:
        """Try to settle every unsettled entry of ``dataset``; return how many were settled."""
        now = time.monotonic()
        if now - self._last.get(dataset, 0.0) < self.every:
            return 0
        self._last[dataset] = now
        settled = 0
        deadline = write_deadline(self.upstreams.values(), self.routes.values())
        for orphan in await self.journal.orphans(dataset, older_than=deadline + self.orphan_grace):
            await self.journal.decide(orphan.seq, "in_doubt", dataset=dataset, error=ORPHANED)
        for entry in await self.journal.in_doubt(dataset):
            try:
                settled += await self.settle(entry)
            except SealError:
                raise  # this replica's key is wrong: the replayer gives the dataset up
            except (UpstreamError, StoreError) as exc:
                log.warning("could not settle journal entry %d yet: %s", entry.seq, exc)
            except IllegalTransition:
                # An SRE settled it meanwhile (`journal resolve`, `journal skip`): theirs stands.
                log.info("journal entry %d was settled meanwhile", entry.seq)
        return settled

    async def settle(self, entry: Entry) -> int:
        original = await self.journal.request_of(entry)
        route = self.routes.get((entry.route, entry.method))
        authority = Side(entry.authority)
        if route is None:
            return 0
        if original.get("key") is None:
            named = await self._named(entry, route)
            if named is not None:
                return await self._read_back(entry, authority, named.path, named.path)
            if route.idempotent_backend:
                return await self._resend(entry, original, route, authority)
            return 0
        values = {"dataset": entry.dataset, **path_values(route.path, original["target"])}
        put = self._put_route(route)
        if put is None:
            return 0  # no way to write a record's state back: stays in doubt, shown
        return await self._read_back(
            entry, authority, _apply(route.path, values), _apply(put[1], values), put[0]
        )

    async def _read_back(
        self,
        entry: Entry,
        authority: Side,
        record_path: str,
        put_path: str,
        put_method: str = "PUT",
        record: str | None = None,
    ) -> int:
        """Settle ``entry`` by its record's current state on the authoritative side: a PUT of
        what it holds, or a DELETE if it holds nothing, queued for replay. ``record``: the
        record the entry turns out to write (a create), named in the same statement."""
        headers = []
        credential = self.credentials.get(authority)
        if credential:
            headers.append(("Authorization", f"Bearer {credential}"))
        upstream = self.upstreams[authority]
        try:
            async with asyncio.timeout(call_deadline(upstream)):
                async with upstream.request(
                    "GET", record_path, headers, b"", role="replay"
                ) as resp:
                    body = await resp.read()
                    status = resp.status
                    content_type = _ctype(resp.raw_headers)
        except TimeoutError:
            log.warning("entry %d: reading its record back timed out", entry.seq)
            return 0
        if status == 200:
            replay = {"method": put_method, "path": put_path}
        elif status == 404:
            replay = {"method": "DELETE", "path": record_path}
        else:
            log.warning("entry %d: the authoritative side answered %d", entry.seq, status)
            return 0
        stored = orjson.dumps(
            {
                "status": status,
                "headers": [["Content-Type", content_type]],
                "body": b64(body if status == 200 else b""),
                "resolved": replay,
            }
        )
        await self.journal.decide(
            entry.seq, "pending", answer=stored, dataset=entry.dataset, record=record
        )
        return 1

    async def _named(self, entry: Entry, route: Route) -> Created | None:
        """The record this create made, once known: said by an SRE (``journal resolve …
        applied --record``), or by the first answer to its re-send; the entry was named after
        it then, and is settled by reading it back (until that succeeds, without re-sending)."""
        answer = await self.journal.answer_of(entry)
        if answer is None or self.router is None or self.namer is None:
            return None
        try:
            named = orjson.loads(answer).get(NAMED)
        except (orjson.JSONDecodeError, AttributeError):
            return None
        if not isinstance(named, dict) or not isinstance(named.get("id"), str):
            return None
        made = record_named(self.router, self.namer, entry.dataset, route, named["id"])
        if made is None or made.token != entry.record:
            log.warning("entry %d: the record named for it does not route to it", entry.seq)
            return None
        return made

    async def _resend(
        self, entry: Entry, original: dict[str, Any], route: Route, authority: Side
    ) -> int:
        """Re-send a write naming no record under the idempotency key it first carried."""
        if entry.last_error == ORPHANED:
            # Its answer is unknown: it may have been a refusal (403, 409) the researcher was
            # owed, which a re-send under the service credential would turn into a write.
            log.warning("entry %d: its writer died; it is never re-sent, stays in doubt", entry.seq)
            return 0
        if original.get("body") is None:
            log.warning("entry %d: its body was not journaled; it stays in doubt", entry.seq)
            return 0
        headers = [(k, v) for k, v in original["headers"] if k.lower() != "content-length"]
        if not any(k.lower() == "idempotency-key" for k, _ in headers):
            log.warning("entry %d: sent without an Idempotency-Key; it stays in doubt", entry.seq)
            return 0
        credential = self.credentials.get(authority)
        if credential:
            headers.append(("Authorization", f"Bearer {credential}"))
        upstream = self.upstreams[authority]
        try:
            async with asyncio.timeout(call_deadline(upstream, route)):
                async with upstream.request(
                    original["method"],
                    original["target"],
                    headers,
                    base64.b64decode(original["body"]),
                    route=route,
                    role="replay",
                ) as resp:
                    body = await resp.read()
                    status = resp.status
                    answer_headers = response_headers(resp.raw_headers)
        except TimeoutError:
            log.warning("entry %d: the re-send timed out; it stays in doubt", entry.seq)
            return 0
        state = outcome_of(status)
        if state == "in_doubt":
            log.warning(
                "entry %d: the re-send was answered %d; it stays in doubt", entry.seq, status
            )
            return 0
        # A 2xx, first answer or fresh, is what the authoritative side holds for this write; a
        # refusal means it had not applied it (else it would answer its stored first answer).
        made = (
            created_record(self.router, self.namer, entry.dataset, route, body)
            if state == "pending" and self.router is not None and self.namer is not None
            else None
        )
        if made is not None:
            # Its record is known: named after it first (still in doubt, it now holds back that
            # record's later writes, wherever they would be replayed), then settled by the
            # record's current state, never by the first answer (writes to it may have been
            # replayed already: see the module).
            named = orjson.dumps({NAMED: {"id": made.id}})
            if not await self.journal.name_record(
                entry.seq, made.token, named, dataset=entry.dataset
            ):
                log.warning("entry %d: settled or named meanwhile; left as it is", entry.seq)
                return 0
            settled = await self._read_back(entry, authority, made.path, made.path)
            if settled:
                log.info(
                    "entry %d settled by an idempotent re-send: its record read back", entry.seq
                )
            return settled
        stored = orjson.dumps({"status": status, "headers": answer_headers, "body": b64(body)})
        await self.journal.decide(
            entry.seq, state, status=status, answer=stored, dataset=entry.dataset
        )
        log.info("entry %d settled by an idempotent re-send: %s", entry.seq, state)
        return 1

    def _put_route(self, route: Route) -> tuple[str, str] | None:
        """The request that writes a record's whole state: this route's ``replay_as``, or that
        of another route on the same path."""
        candidates = [route, *(r for r in self.routes.values() if r.path == route.path)]
        for candidate in candidates:
            if candidate.replay_as is not None and candidate.create_id is None:
                method, _, path = candidate.replay_as.partition(" ")
                return method, path
        return None


def _apply(template: str, values: Mapping[str, str]) -> str:
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def _ctype(raw: list[tuple[str, str]]) -> str:
    return next((v for k, v in raw if k.lower() == "content-type"), "application/json")
