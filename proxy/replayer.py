"""The replayer: applies journaled writes to the other side, in per-record order.

One replayer is active per dataset across the fleet, by a Postgres lease; if its replica dies the
lease expires and another takes over. Each round it takes the replayable entries (the first pending
entries of each record's chain: see ``bascule/state/journal/replay.py``), applies each record's in
order and distinct records concurrently, and marks each *applied*, *retry later* (with exponential
backoff and jitter, for 5xx, timeouts and unreachable backends: the other side may be down for a
while), or *dead* (a refusal the other side would repeat, or an answer of another kind than the
authoritative side's: it blocks the gate and is shown to SREs).

A replay carries bascule's own idempotency key (``bascule:{dataset}:{seq}``) and the backend's
service credential from the environment, never a researcher's ``Authorization``. A route with
``replay_as`` is replayed as that request carrying the authoritative side's answer, so both
sides store identical rows (server-assigned ids and server-set fields included).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from bascule import telemetry
from bascule.config import Route
from bascule.errors import StoreError, UpstreamBusy, UpstreamError
from bascule.sealing import SealError
from bascule.stages import Side
from bascule.state import leases
from bascule.state.fleet import StageView
from bascule.state.journal import Journal
from bascule.state.journal.entries import Entry
from bascule.state.journal.queries import purge
from bascule.upstream import Upstream
from proxy.dualwrite import call_deadline, write_deadline
from proxy.plan import plan
from proxy.routing import json_pointer, path_values

if TYPE_CHECKING:
    from proxy.resolver import Resolver

log = logging.getLogger("bascule.replayer")

_RETRYABLE = frozenset({408, 425, 429})


@dataclass
class Replayer:
    journal: Journal
    view: StageView
    upstreams: Mapping[Side, Upstream]
    routes: Mapping[tuple[str, str], Route]
    """(route template, method) -> the route, to know how to replay an entry."""
    credentials: Mapping[Side, str | None]
    replica: str
    lease_seconds: float = 5.0
    resolver: Resolver | None = None
    retention: float | None = None
    """Seconds settled entries are kept; None: never purged here."""
    concurrency: int = 256
    """Records replayed at once (each one's entries in order)."""
    wave: int = 1024
    """Entries taken per round."""
    run_length: int = 16
    """Consecutive entries of one record taken per round."""
    idle_wait: float = 0.05
    """Seconds after the first round that found nothing to replay; each further one doubles
    the wait, up to ``idle_max``."""
    idle_max: float = 0.5
    """The longest wait between idle rounds. An entry this replica journals wakes a replayer
    holding a lease at once; one journaled by another replica waits for the next round, and
    a lease whose holder died is taken over up to this much later."""
    trickle_wait: float = 0.01
    """Seconds after a round that replayed all there was: the next takes what came meanwhile.
    Longer batches more writes per round, in bursts that compete with researchers' writes
    (at concurrency 1 on 2 cores, 50 ms made the write p99 11 ms, 10 ms 8.6 ms; same p50)."""
    base_delay: float = 0.2
    max_delay: float = 5.0
    probe_every: float = 1.0
    """The longest wait between probes of a side found unreachable (from ``base_delay``,
    doubling): a probe costs one call and one wave query, and replay resumes at most this long
    after the side is back."""
    sleep: Callable[[float], Any] = asyncio.sleep
    _held: dict[str, float] = field(default_factory=dict)
    """Per dataset: the loop time at which this replica's replay lease may have expired."""
    _renewed: dict[str, float] = field(default_factory=dict)
    """Per dataset: the loop time at which this replica last renewed its replay lease."""
    _more: dict[str, bool] = field(default_factory=dict)
    """Per dataset: whether its last round was cut short (more may be replayable at once)."""
    _down: dict[Side, float] = field(default_factory=dict)
    """Per side: the loop time before which it is known unreachable (the circuit breaker):
    no replay to it starts, and a round for it reads nothing from the journal."""
    _backoff: dict[Side, float] = field(default_factory=dict)
    """Per side found unreachable and not yet reached again: its current wait, doubled at
    each failed probe up to ``probe_every``. While set, a round first probes with one entry."""

    @property
    def creates(self) -> frozenset[str]:
        """The routes that create a record (``"METHOD template"``): one of their entries left
        in doubt holds back only dataset-wide writes (``bascule/state/journal/replay.py``)."""
        return creates_of(self.routes)

    async def run(self) -> None:
        """Replay until cancelled."""
        last_purge = 0.0
        loop = asyncio.get_running_loop()
        idle = self.idle_wait
        woke = False
        while True:
            busy = trickle = False
            if self.retention is not None and loop.time() - last_purge > 60.0:
                last_purge = loop.time()
                with contextlib.suppress(StoreError):
                    if await self._lease("purge"):
                        purged = await purge(self.journal.pool, self.retention)
                        if purged:
                            log.info("purged %d settled journal entries", purged)
            for dataset, row in list(self.view.stages.items()):
                other = plan(row.stage, "write").replicate
                if other is None:
                    continue
                try:
                    if not await self._lease(f"replay:{dataset}"):
                        continue
                    if self.resolver is not None:
                        busy |= await self.resolver.round(dataset) > 0
                    # A round that took everything replayable is followed by a wait, so that
                    # the next one takes what arrived meanwhile in one wave instead of a round
                    # (and its queries) per write trickling in; a short one if it found any.
                    trickle |= await self.round(dataset) > 0
                    busy |= self._more.get(dataset, False)
                except StoreError as exc:
                    log.warning("replayer: %s", exc)
                    await self._recover()
                except SealError:
                    # Nothing is marked dead for it: give the lease up and let a replica with
                    # the right key replay.
                    log.error(
                        "ALARM: this replica cannot open journal entries: wrong "
                        "BASCULE_JOURNAL_KEY? It stops replaying %s",
                        dataset,
                    )
                    await self._release(f"replay:{dataset}")
                    await self.sleep(30.0)
                except Exception as exc:  # the replayer must outlive any one bad round
                    log.error("replayer round failed: %s", type(exc).__name__, exc_info=exc)
                    await self._recover()
            if busy or trickle:
                idle, woke = self.idle_wait, False
                if not busy:
                    await self.sleep(self.trickle_wait)
            else:
                woke = await self._idle(idle, after_wake=woke)
                idle = min(2 * idle, self.idle_max)

    async def _idle(self, seconds: float, *, after_wake: bool) -> bool:
        """Wait ``seconds`` between rounds that found nothing; return whether a wake ended
        the wait. A replica holding a dataset's lease wakes early when it journals an entry of
        that dataset (then waits ``trickle_wait`` more, so that a burst of writes is taken in
        one round, not a round each). ``after_wake``: the last wake found nothing replayable
        (entries held back behind an unsettled one): no wake is taken for ``idle_wait``, so
        such a stream of writes costs no more rounds than polling every ``idle_wait`` did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        if after_wake:
            await self.sleep(min(self.idle_wait, seconds))
        while True:
            now = loop.time()
            held = {dataset for dataset, until in self._held.items() if until > now}
            if not held:  # replays nothing: polls for a lease to take over
                await self.sleep(max(0.0, deadline - now))
                return False
            # Datasets another replica replays are dropped: its polling finds their entries.
            if self.journal.take_woken() & held:
                await self.sleep(self.trickle_wait)
                return True
            if now >= deadline:
                return False
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # arriving in the step its awaitable finishes, and the replayer would not stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - now):
                    await self.journal.woken()

    async def _recover(self) -> None:
        # Connections that lived through a store outage may be unusable: start afresh.
        with contextlib.suppress(Exception):
            await self.journal.pool.expire_connections()
        await self.sleep(1.0)

    async def _release(self, name: str) -> None:
        self._held.pop(name.removeprefix("replay:"), None)
        self._renewed.pop(name.removeprefix("replay:"), None)
        await leases.release(self.journal.pool, name, self.replica)

    async def _lease(self, name: str) -> bool:
        # A round starts no call once the lease has expired, and each call is held to the call
        # deadline. Another replica takes an expired lease only a further deadline later: by
        # then every call of the previous holder has finished or been abandoned, and no two
        # replicas ever have replays of one record in flight at once.
        deadline = self._deadline()
        duration = max(self.lease_seconds, deadline + 1.0)
        # Measured from before the database set the expiry, less a margin: never later than it.
        asked = asyncio.get_running_loop().time()
        dataset = name.removeprefix("replay:") if name.startswith("replay:") else None
        if dataset is not None:
            # Renewed at most every half lease (not every round): held until ``_held`` anyway.
            renewed, held = self._renewed.get(dataset), self._held.get(dataset)
            if (
                renewed is not None
                and held is not None
                and asked < min(renewed + duration / 2, held)
            ):
                return True
        if not await leases.take(self.journal.pool, name, self.replica, duration, deadline):
            return False
        if dataset is not None:
            self._held[dataset] = asked + duration - 0.5
            self._renewed[dataset] = asked
        return True

    def _deadline(self) -> float:
        return write_deadline(self.upstreams.values(), self.routes.values())

    async def round(self, dataset: str) -> int:
        """Apply one wave of replayable entries of ``dataset``; return how many were tried.

        A wave holds up to ``run`` consecutive entries of each record: a record's entries are
        applied one after the other, stopping at its first failure (the entries after it stay
        pending, held back by it); records go concurrently. The wave, with its requests and
        answers, comes in one query and the successes are marked in one statement: per entry,
        only the replay itself is a round trip."""
        loop = asyncio.get_running_loop()
        row = self.view.stages.get(dataset)
        side = plan(row.stage, "write").replicate if row is not None else None
        if side is not None and self._down.get(side, 0.0) > loop.time():
            # Known unreachable: its entries wait, untouched, for the next probe (trying each
            # cost a failed call and a statement per entry, round after round).
            self._more[dataset] = False
            return 0
        entries, payloads = await self.journal.wave(
            dataset, limit=self.wave, run=self.run_length, creates=self.creates
        )
        if not entries:
            self._more[dataset] = False
            return 0
        chains: dict[str, list[Entry]] = {}
        for entry in entries:  # in seq order, so each chain is in its record's order
            chains.setdefault(entry.record, []).append(entry)
        gate = asyncio.Semaphore(self.concurrency)

        held = self._held.get(dataset)

        def stopped() -> bool:
            # No call starts past the lease: each ends within its deadline, and another
            # replica takes the lease over only a deadline after it expired. None to a side
            # found unreachable meanwhile.
            return (held is not None and loop.time() >= held) or (
                side is not None and self._down.get(side, 0.0) > loop.time()
            )

        async def chain(run: list[Entry], done: list[int]) -> list[int]:
            async with gate:
                for entry in run[len(done) :]:
                    if stopped() or not await self.apply(entry, payloads.get(entry.seq)):
                        break
                    done.append(entry.seq)
            return done

        async def failed(done: list[int]) -> list[int]:
            return done

        first = next(iter(chains.values()))
        probe: list[int] | None = None  # the first chain's progress, once probed
        if side is not None and side in self._backoff and not stopped():
            # It was unreachable: one replay probes it before the wave goes.
            probe = [first[0].seq] if await self.apply(first[0], payloads.get(first[0].seq)) else []
        applied = await asyncio.gather(
            *(
                chain(run, [])
                if run is not first or probe is None
                else chain(run, probe)
                if probe
                else failed(probe)  # its first entry failed: the chain stops there
                for run in chains.values()
            )
        )
        await self.journal.applied_many([seq for done in applied for seq in done])
        # More may be replayable at once only if this wave was cut short: by its size, or by
        # the run length of a record it applied whole.
        self._more[dataset] = len(entries) >= self.wave or any(
            len(run) >= self.run_length and len(done) == len(run)
            for run, done in zip(chains.values(), applied, strict=True)
        )
        return len(entries)

    async def apply(
        self, entry: Entry, payload: tuple[dict[str, Any], bytes | None] | None = None
    ) -> bool:
        """Replay one entry; True when it was applied (the caller marks it so)."""
        target = Side.TARGET if entry.authority == Side.SOURCE.value else Side.SOURCE
        upstream = self.upstreams[target]
        try:
            if payload is None:
                payload = (
                    await self.journal.request_of(entry),
                    await self.journal.answer_of(entry),
                )
            method, path, headers, body = self._replay_request(entry, target, *payload)
        except SealError:
            raise  # this replica's key is wrong: the entry is fine, this replica is not
        except (ValueError, KeyError) as exc:
            await self.journal.dead(entry.seq, f"cannot build the replay: {type(exc).__name__}")
            return False
        route = self.routes.get((entry.route, entry.method))
        with telemetry.replay(
            {
                telemetry.DATASET: entry.dataset,
                telemetry.ROUTE: entry.route,
                "http.request.method": entry.method,
                "bascule.journal.seq": entry.seq,
                telemetry.ORIGIN: target.value,
            },
            entry.traceparent,
            method,
        ) as traced:
            try:
                async with asyncio.timeout(call_deadline(upstream, route)):
                    async with upstream.request(
                        method, path, headers, body, route=route, role="replay"
                    ) as resp:
                        await resp.read()
                        status = resp.status
            except UpstreamError as exc:
                traced.finish(failed=True, error=type(exc).__name__)
                if not exc.sent and not isinstance(exc, UpstreamBusy):
                    self._unreachable(target)  # never reached (refused, no connection in time)
                await self._later(entry, type(exc).__name__)
                return False
            except TimeoutError:
                # The deadline cancelled the call: its span (sampled) says CancelledError.
                traced.finish(failed=True, error="CancelledError")
                await self._later(entry, "deadline")
                return False
            if target in self._backoff:
                log.info("replayer: %s answers again; replay resumes", upstream.name)
            self._backoff.pop(target, None)
            self._down.pop(target, None)
            # A DELETE of what the other side does not have leaves both sides equal.
            applied = 200 <= status < 300 or (method == "DELETE" and status == 404)
            traced.finish(status, failed=not applied)
        if applied:
            return True
        if status >= 500 or status in _RETRYABLE:
            await self._later(entry, f"status {status}")
        else:
            await self.journal.dead(entry.seq, f"the other side answered {status}")
        return False

    def _unreachable(self, side: Side) -> None:
        """Open the circuit breaker of ``side``: no replay to it for a while, then a probe."""
        longest = min(self.max_delay, self.probe_every)
        wait = min(longest, 2 * self._backoff[side]) if side in self._backoff else None
        if wait is None:
            log.warning("replayer: the %s side is unreachable; replays to it wait", side.value)
        wait = wait or min(longest, self.base_delay)
        self._backoff[side] = wait
        self._down[side] = asyncio.get_running_loop().time() + wait * random.uniform(0.5, 1.0)

    async def _later(self, entry: Entry, error: str) -> None:
        delay = min(self.max_delay, self.base_delay * 2 ** min(entry.attempts, 10))
        await self.journal.retry_later(entry.seq, error, delay * random.uniform(0.5, 1.0))

    def _replay_request(
        self, entry: Entry, side: Side, original: dict[str, Any], answer: bytes | None
    ) -> tuple[str, str, list[tuple[str, str]], bytes]:
        route = self.routes.get((entry.route, entry.method))
        headers = [(k, v) for k, v in original["headers"] if not _ours(k)]
        headers.append(("Idempotency-Key", f"bascule:{entry.dataset}:{entry.seq}"))
        credential = self.credentials.get(side)
        if credential:
            headers.append(("Authorization", f"Bearer {credential}"))
        stored = orjson.loads(answer) if answer is not None else {}
        if "resolved" in stored:
            # Settled by the resolver: write back the authoritative side's current state.
            resolved = stored["resolved"]
            body = base64.b64decode(stored["body"])
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
            if resolved["method"] != "DELETE":
                headers.append(("Content-Type", stored["headers"][0][1]))
            return resolved["method"], resolved["path"], headers, body
        if route is None or route.replay_as is None:
            if original.get("body") is None:
                raise ValueError("its body was not journaled")
            body = base64.b64decode(original["body"])
            return original["method"], original["target"], headers, body
        if answer is None:
            raise ValueError("no authoritative answer to replay")
        body = base64.b64decode(stored["body"])
        method, _, template = route.replay_as.partition(" ")
        values = {"dataset": entry.dataset}
        values.update(path_values(route.path, original["target"]))
        if route.create_id is not None:
            values["id"] = str(json_pointer(orjson.loads(body), route.create_id))
        path = template
        for name, value in values.items():
            path = path.replace("{" + name + "}", value)
        headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
        content_type = next(
            (v for k, v in stored["headers"] if k.lower() == "content-type"), "application/json"
        )
        headers.append(("Content-Type", content_type))
        return method, path, headers, body


def creates_of(routes: Mapping[tuple[str, str], Route]) -> frozenset[str]:
    """``"METHOD template"`` of every route whose writes create a record named by their answer
    (``create_id`` and ``replay_as``)."""
    return frozenset(
        f"{method} {template}"
        for (template, method), route in routes.items()
        if route.create_id is not None and route.replay_as is not None
    )


def _ours(name: str) -> bool:
    return name.lower() in ("idempotency-key", "authorization", "content-length")
