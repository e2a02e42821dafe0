"""Noise proposals in Postgres: pairs counted, SRE decisions audited, accepted rules read back.

The algorithm that finds them is :mod:`shadow.noise`; the Redis nudge that tells every replica
a decision was made is :mod:`shadow.noise_news`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
import redis.asyncio as aioredis

from bascule.checks import check_actor, check_name, check_text, require_reason
from bascule.config import Config
from bascule.errors import Refused, UnknownDataset, UnknownProposal, UsageError
from bascule.state import audit
from bascule.state.postgres import reaching_postgres
from bascule.state.stage_store import StageStore
from shadow import noise_news
from shadow.diff import PLAIN_NAME
from shadow.noise import (
    DEFAULT_PAIRS,
    AcceptedRules,
    Observation,
    covers_document,
    observation_order,
)
from shadow.pointers import parse_pointer

Decision = Literal["accepted", "rejected"]


def noise_pairs(config: Config) -> dict[str, int]:
    """Each configured dataset's ``noise_pairs``: the pairs that make a proposal."""
    return {name: dataset.noise_pairs for name, dataset in config.datasets.items()}


def pairs_needed(pairs: Mapping[str, int], dataset: str) -> int:
    """``dataset``'s ``noise_pairs``; UnknownDataset (naming the configured ones) if none."""
    check_name(dataset)
    if dataset not in pairs:
        raise UnknownDataset(dataset, list(pairs))
    return pairs[dataset]


_COLUMNS = (
    "route, pointer, rule, key, pairs, first_seen, last_seen, decision, decided_by, decided_at,"
    " reason"
)


@dataclass
class NoiseStore:
    """Observations counted in Postgres, decisions audited there, announced on Redis."""

    pool: asyncpg.Pool
    redis: aioredis.Redis
    prefix: str

    async def record(self, dataset: str, route: str, observations: Iterable[Observation]) -> None:
        """One more independent pair for each observation (an upsert, one statement).

        Called once per pair: an observation repeated in ``observations`` counts once. Rows are
        written in one order so two replicas recording at once cannot deadlock."""
        unique = sorted(
            {n for o in observations if (n := _normal(o)) is not None}, key=observation_order
        )
        if not unique:
            return
        async with reaching_postgres():
            await self.pool.execute(
                "INSERT INTO bascule_noise (dataset, route, pointer, rule, key)"
                " SELECT $1, $2, o.pointer, o.rule, o.key"
                " FROM unnest($3::text[], $4::text[], $5::text[]) WITH ORDINALITY"
                "   AS o(pointer, rule, key, n)"
                " ORDER BY o.n"
                " ON CONFLICT (dataset, route, pointer, rule, (coalesce(key, '')))"
                " DO UPDATE SET pairs = bascule_noise.pairs + 1, last_seen = now()",
                dataset,
                route,
                [o.pointer for o in unique],
                [o.rule for o in unique],
                [o.key for o in unique],
            )

    async def proposals(self, dataset: str, min_pairs: int = DEFAULT_PAIRS) -> list[dict[str, Any]]:
        """Pending proposals seen in at least ``min_pairs`` pairs, then decided ones (whatever
        their count), each with its counts, first and last seen, and ``status``."""
        await self._known(dataset)
        async with reaching_postgres():
            rows = await self.pool.fetch(
                f"SELECT {_COLUMNS} FROM bascule_noise"
                " WHERE dataset = $1 AND (decision IS NOT NULL OR pairs >= $2)"
                " ORDER BY decision IS NOT NULL, pairs DESC, pointer, route, rule, key",
                dataset,
                min_pairs,
            )
        return [_proposal(r) for r in rows]

    async def decide(
        self,
        dataset: str,
        pointer: str,
        accept: bool,
        reason: str | None,
        who: str,
        route: str | None = None,
        *,
        min_pairs: int = DEFAULT_PAIRS,
        details: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Accept or reject the proposal at ``pointer`` (on every route it was seen on, or on
        ``route`` only), audited in the same transaction, then announced.

        Refused (nothing changed): UsageError for a missing reason, who or a malformed pointer;
        UnknownDataset; UnknownProposal when nothing was observed there; Refused when it was seen
        in fewer than ``min_pairs`` pairs (not a proposal yet: noise is learned, never assumed),
        when it already has that decision, or when it would accept a second key for one array.
        A decided proposal may be decided again the other way (an accept is undone by a
        reject), each time audited."""
        check_name(dataset)
        reason = require_reason(reason)
        check_actor(who)
        check_text("by", who)
        try:
            parse_pointer(pointer)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if route is not None:
            check_text("route", route)
        await self._known(dataset)
        decision: Decision = "accepted" if accept else "rejected"
        async with reaching_postgres(), self.pool.acquire() as conn, conn.transaction():
            # First: the row lock serializes this dataset's decisions until the commit.
            version = await conn.fetchval(
                "INSERT INTO bascule_noise_version (dataset, version) VALUES ($1, 1)"
                " ON CONFLICT (dataset) DO UPDATE"
                " SET version = bascule_noise_version.version + 1 RETURNING version",
                dataset,
            )
            rows = await conn.fetch(
                "SELECT route, rule, key, pairs, decision FROM bascule_noise"
                " WHERE dataset = $1 AND pointer = $2 AND ($3::text IS NULL OR route = $3)"
                " ORDER BY route, rule, key FOR UPDATE",
                dataset,
                pointer,
                route,
            )
            if not rows:
                raise UnknownProposal(dataset, pointer, route)
            proposed = [r for r in rows if r["decision"] is not None or r["pairs"] >= min_pairs]
            if not proposed:
                most = max(r["pairs"] for r in rows)
                raise Refused(
                    f"{dataset}: {pointer!r} was seen differing in {most} independent "
                    f"pair{'s' if most != 1 else ''}; it becomes a proposal at {min_pairs}"
                )
            changing = [r for r in proposed if r["decision"] != decision]
            if not changing:
                raise Refused(f"{dataset}: {pointer!r} is already {decision}")
            if accept:
                _one_key_per_array(dataset, pointer, rows, changing)
            for r in changing:
                await conn.execute(
                    "UPDATE bascule_noise SET decision = $6, decided_by = $7, decided_at = now(),"
                    " reason = $8 WHERE dataset = $1 AND route = $2 AND pointer = $3"
                    " AND rule = $4 AND coalesce(key, '') = coalesce($5, '')",
                    dataset,
                    r["route"],
                    pointer,
                    r["rule"],
                    r["key"],
                    decision,
                    who,
                    reason,
                )
            decided = [
                {
                    "route": r["route"],
                    "rule": r["rule"],
                    "key": r["key"],
                    "pairs": r["pairs"],
                    "was": r["decision"],
                }
                for r in changing
            ]
            await audit.record(
                conn,
                dataset,
                "noise-accept" if accept else "noise-reject",
                actor=who,
                reason=reason,
                details={
                    **(details or {}),
                    "pointer": pointer,
                    "rules": decided,
                    "version": version,
                },
            )
        announced = await noise_news.announce(self.redis, self.prefix, dataset, version)
        return {
            "dataset": dataset,
            "pointer": pointer,
            "decision": decision,
            "rules": decided,
            "version": version,
            "announced": announced,
        }

    async def accepted(self, dataset: str) -> AcceptedRules:
        """The accepted rules of ``dataset`` by route template, from Postgres (Redis plays no
        part: a replica reads them whether or not Redis is up). An unknown dataset has none."""
        async with reaching_postgres():
            rows = await self.pool.fetch(
                "SELECT route, pointer, rule, key FROM bascule_noise"
                " WHERE dataset = $1 AND decision = 'accepted'"
                " ORDER BY route, pointer, rule, key",
                dataset,
            )
        ignore: dict[str, list[str]] = {}
        unordered: dict[str, dict[str, str]] = {}
        for r in rows:
            if covers_document(r["pointer"]):
                continue
            ignore.setdefault(r["route"], [])
            unordered.setdefault(r["route"], {})
            if r["rule"] == "ignore":
                ignore[r["route"]].append(r["pointer"])
            else:
                unordered[r["route"]].setdefault(r["pointer"], r["key"])
        return {route: (tuple(ignore[route]), unordered[route]) for route in ignore}

    async def version(self, dataset: str | None = None) -> int:
        """A number that changes with every decision (of ``dataset``, or of any): reload the
        accepted rules when it is not the one they were loaded at. Read the version *before*
        the rules, so a decision committed in between is seen at the next look."""
        async with reaching_postgres():
            found = await self.pool.fetchval(
                "SELECT coalesce(sum(version), 0)::bigint FROM bascule_noise_version"
                " WHERE $1::text IS NULL OR dataset = $1",
                dataset,
            )
        return int(found)

    async def listen(
        self,
        on_change: Callable[[str | None], Awaitable[None]],
        stopping: asyncio.Event | None = None,
    ) -> None:
        """Hear decisions announced on Redis: :func:`shadow.noise_news.listen`."""
        await noise_news.listen(self.redis, self.prefix, on_change, stopping)

    async def _known(self, dataset: str) -> None:
        await StageStore(self.pool).get(dataset)  # UnknownDataset names the known ones


def _normal(o: Observation) -> Observation | None:
    """``o`` as stored (no key on an ignore), or None if it is not one that may be recorded."""
    if covers_document(o.pointer):
        return None
    if o.rule == "ignore":
        return o if o.key is None else Observation(o.pointer, "ignore")
    if o.rule == "unordered" and o.key is not None and PLAIN_NAME.fullmatch(o.key):
        return o
    return None


def _one_key_per_array(
    dataset: str, pointer: str, rows: Sequence[asyncpg.Record], changing: Sequence[asyncpg.Record]
) -> None:
    """Refuse to leave two accepted unordered rules with different keys on one route."""
    accepting = {(r["route"], r["rule"], r["key"]) for r in changing}
    keys: dict[str, set[str]] = {}
    for r in rows:
        if r["rule"] == "unordered" and (
            r["decision"] == "accepted" or (r["route"], r["rule"], r["key"]) in accepting
        ):
            keys.setdefault(r["route"], set()).add(r["key"])
    for route, found in keys.items():
        if len(found) > 1:
            raise Refused(
                f"{dataset}: {pointer!r} on {route!r} would be matched by "
                f"{' and '.join(sorted(found))}; accept one key (name the route) "
                "or reject the other first"
            )


def _proposal(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "route": r["route"],
        "pointer": r["pointer"],
        "rule": r["rule"],
        "key": r["key"],
        "pairs": r["pairs"],
        "first_seen": r["first_seen"].isoformat(),
        "last_seen": r["last_seen"].isoformat(),
        "status": r["decision"] or "pending",
        "decision": r["decision"],
        "decided_by": r["decided_by"],
        "decided_at": r["decided_at"].isoformat() if r["decided_at"] else None,
        "reason": r["reason"],
    }
