"""Shadow reads: a sampled read re-sent to the shadowed side, off the researcher's path, and
compared with the answer the researcher got.

The researcher's answer is never held back: the proxy hands the request and the serving side's
answer to :meth:`Dispatcher.submit` once it has answered, and a worker does the rest. Shadow
reads have their own connection pools (so a slow shadowed side cannot take the connections
writes and replays need), their own deadline, a bounded number in flight and a bounded queue
(in entries and in bytes); a full queue drops the shadow read and counts it ``dropped``.

**Race guard.** Before the serving side is asked, the proxy notes the time ``t0`` on the state
database's clock (estimated locally, never a round trip on the researcher's path: see
:class:`DbClock`). Every write to a record has a journal entry whose ``decided_at`` follows the
authoritative side's commit. So, for the record read (its token and the dataset-wide ``*``) or,
for a read that names no record, the whole dataset:

- an entry decided at or before ``t0`` is in the serving side's answer: the shadow read must
  see it too, so it waits until the entry is applied to the other side (past ``lag_wait``:
  *skipped: lagging*);
- an entry still at *intent*, or decided after ``t0``, may be in one answer and not the other:
  the comparison is *skipped: raced*, never a mismatch.

The journal is checked once the shadowed side has answered (one statement, see
:meth:`proxy.journal.Journal.race`); a lagging read is asked again once the side caught up.

**Noise.** On ``noise_sample`` of shadow reads the serving side is asked a second time; if no
write to the dataset was decided in between, what differs between its two answers is noise,
recorded as observations (:mod:`shadow.noise`) an SRE may accept as rules.

Nothing here logs, traces or counts a value: counters, pointers and kinds only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from multidict import CIMultiDict
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from bascule.config import CompareRules, Config, ShadowSettings
from bascule.errors import StoreError, UpstreamError
from bascule.tasks import spawn
from cutover.stages import Side
from proxy.upstream import Upstream
from shadow.compare import Answer, Rules, compare, compile_rules
from shadow.diff import Diff
from shadow.ledger import Ledger, Outcome
from shadow.noise import merge, observe

log = logging.getLogger("bascule.shadow")
_tracer = trace.get_tracer("bascule.shadow")
_propagator = TraceContextTextMapPropagator()

SHADOW_HEADER = ("X-Bascule-Shadow", "1")
THREAD_ABOVE = 256 * 1024
"""Answers larger than this are compared in a worker thread, so the event loop keeps serving."""
_POLL = 0.02


@dataclass(frozen=True, slots=True)
class Job:
    """One shadow read: the researcher's request and the answer the serving side gave."""

    dataset: str
    route: str
    """The route template: never the concrete path."""
    method: str
    target: str
    headers: Sequence[tuple[str, str]]
    body: bytes
    serving: Side
    shadowed: Side
    answer: Answer
    t0: float
    """When the serving side was asked, on the state database's clock (epoch seconds)."""
    records: tuple[str, ...] | None
    """Record tokens the read depends on (its own and ``*``), or None for the whole dataset."""
    traceparent: str | None = None

    @property
    def size(self) -> int:
        return len(self.answer.body) + len(self.body)


class DbClock:
    """The state database's clock, estimated locally: ``now()`` is local time plus the offset
    measured by :meth:`calibrate` (a round trip, off the researcher's path), minus the half
    round trip and a margin, so the estimate is never later than the database's time — a write
    decided just before the estimate is then taken as raced, the safe side."""

    MARGIN = 0.010

    def __init__(self) -> None:
        self.offset = 0.0
        self.error = 1.0  # until calibrated: a wide margin

    async def calibrate(self, pool: Any) -> None:
        before = time.time()
        db = await pool.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
        after = time.time()
        self.offset = float(db) - (before + after) / 2
        self.error = (after - before) / 2

    def now(self) -> float:
        return time.time() + self.offset - self.error - self.MARGIN


Guard = Callable[[str, tuple[str, ...] | None, float], Any]
"""``(dataset, records, t0) -> awaitable (raced, lagging)``: the journal's race check."""


class Dispatcher:
    """Runs the shadow reads of one replica."""

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        upstreams: Mapping[Side, Upstream],
        token: Callable[[str], str],
        *,
        guard: Guard | None = None,
        clock_pool: Any = None,
        noise: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        """``upstreams``: the shadow reads' own pools, one per side. ``guard``: the journal's
        race check (None when this replica has no journal: it then accepts no write in a
        stage that shadows, so nothing can race). ``noise``: a :class:`shadow.noise.NoiseStore`
        (None: no noise learning)."""
        self.config = config
        self.settings: ShadowSettings = config.shadow
        self.ledger = ledger
        self.upstreams = upstreams
        self.token = token
        self.guard = guard
        self.clock = DbClock()
        self.clock_pool = clock_pool
        self.noise = noise
        self.rng = rng or random.Random()
        self._queue: asyncio.Queue[Job] = asyncio.Queue(self.settings.queue)
        self._queued_bytes = 0
        self._max_queued_bytes = 4 * self.settings.max_body_bytes
        self._counts: Counter[tuple[str, str, Outcome]] = Counter()
        self._rules: dict[tuple[str, str], Rules] = {}
        self._accepted: dict[str, dict[str, tuple[tuple[str, ...], dict[str, str]]]] = {}
        self._routes = {r.path: r for r in config.routes}
        self._tasks: list[asyncio.Task[None]] = []
        self._noise_version: Any = None

    # -- the researcher's path -------------------------------------------------------------

    def wanted(self, dataset: str) -> bool:
        """Whether to shadow-read this read (sampled per dataset)."""
        share = self.config.dataset(dataset).shadow_sample
        return share >= 1.0 or (share > 0.0 and self.rng.random() < share)

    def now(self) -> float:
        return self.clock.now()

    def submit(self, job: Job) -> None:
        """Queue a shadow read; never waits. Full (in entries or bytes): dropped, counted."""
        size = job.size
        if self._queued_bytes + size > self._max_queued_bytes:
            self.count(job.dataset, job.route, "dropped")
            return
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.count(job.dataset, job.route, "dropped")
            return
        self._queued_bytes += size

    def count(self, dataset: str, route: str, outcome: Outcome) -> None:
        """Counted in memory, flushed to the ledger about once a second (one pipeline)."""
        self._counts[(dataset, route, outcome)] += 1

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self.clock_pool is not None:
            with contextlib.suppress(Exception):
                await self.clock.calibrate(self.clock_pool)
        await self._reload_noise_rules()
        self._tasks = [
            spawn(self._worker(), name=f"shadow-{i}") for i in range(self.settings.concurrency)
        ]
        self._tasks.append(spawn(self._housekeeping(), name="shadow-housekeeping"))
        if self.noise is not None:
            # Decisions heard on Redis at once; the housekeeping's poll of Postgres covers
            # Redis being away.
            self._tasks.append(spawn(self.noise.listen(self._noise_decided), name="noise-listen"))

    async def _noise_decided(self, dataset: str | None) -> None:
        await self._reload_noise_rules()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.flush()

    async def flush(self) -> None:
        counts, self._counts = self._counts, Counter()
        if counts:
            await self.ledger.count_many(counts)

    async def _housekeeping(self) -> None:
        """Counters flushed every second; the clock and accepted noise rules every 10 s."""
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            try:
                await self.flush()
                if tick % 10 == 0:
                    if self.clock_pool is not None:
                        await self.clock.calibrate(self.clock_pool)
                    await self._reload_noise_rules()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the housekeeping alive: the next tick retries
                log.warning("shadow housekeeping: %s", type(exc).__name__)

    async def _reload_noise_rules(self) -> None:
        if self.noise is None:
            return
        try:
            version = await self.noise.version()
            if version == self._noise_version:
                return
            accepted = {name: await self.noise.accepted(name) for name in self.config.datasets}
        except Exception as exc:  # the state stores away: keep the rules in hand
            log.warning("accepted noise rules not reloaded (%s)", type(exc).__name__)
            return
        self._accepted, self._rules, self._noise_version = accepted, {}, version

    def rules(self, dataset: str, route: str) -> Rules:
        """The route's rules (or its dataset's), with the noise rules SREs accepted."""
        key = (dataset, route)
        compiled = self._rules.get(key)
        if compiled is None:
            declared = self._routes.get(route)
            base: CompareRules = (
                declared.compare
                if declared is not None and declared.compare is not None
                else self.config.dataset(dataset).compare
            )
            extra = self._accepted.get(dataset, {}).get(route)
            if extra is not None:
                base = merge(base, *extra)
            compiled = self._rules[key] = compile_rules(base)
        return compiled

    # -- the shadow read -------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            job = await self._queue.get()
            self._queued_bytes -= job.size
            try:
                await self.run(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The class only: a message could quote what a backend answered.
                log.error("shadow read of %s %s failed: %s", job.dataset, job.route, type(exc))
                self.count(job.dataset, job.route, "errored")
            finally:
                self._queue.task_done()

    async def join(self) -> None:
        """Until every queued shadow read is done, and its counts flushed (tests, shutdown)."""
        await self._queue.join()
        await self.flush()

    async def run(self, job: Job) -> Outcome:
        """Shadow-read, guard, compare and record one job; return its outcome."""
        parent = _propagator.extract({"traceparent": job.traceparent}) if job.traceparent else None
        with _tracer.start_as_current_span(
            "bascule.shadow_read",
            context=parent,
            kind=trace.SpanKind.INTERNAL,
            attributes={"bascule.dataset": job.dataset, "bascule.route": job.route},
        ) as span:
            outcome, diff = await self._outcome(job)
            span.set_attribute("bascule.outcome", outcome)
            trace_id = _trace_id(span)
            if diff is not None:
                span.set_attribute("bascule.diff.count", len(diff.differences) + diff.truncated)
                span.set_attribute(
                    "bascule.diff.pointers",
                    [f"{d.part}:{d.pointer}:{d.kind}" for d in diff.differences[:20]],
                )
                await self.ledger.mismatch(job.dataset, job.route, diff, trace_id, count=False)
            self.count(job.dataset, job.route, outcome)
            if outcome in ("matched", "mismatched"):
                self.count(job.dataset, job.route, "compared")
        # Whatever the comparison gave: noise is what makes answers differ on their own.
        if self._noise_wanted(job):
            await self._noise(job)
        return outcome

    async def _outcome(self, job: Job) -> tuple[Outcome, Diff | None]:
        waited_until = time.monotonic() + self.settings.lag_wait
        while True:
            try:
                other = await self._ask(job.shadowed, job)
            except (UpstreamError, TimeoutError) as exc:
                log.info(
                    "shadow read %s %s: %s side did not answer (%s)",
                    job.dataset,
                    job.route,
                    job.shadowed.value,
                    type(exc).__name__,
                )
                return "errored", None
            if other is None:
                return "skipped_large", None
            verdict = await self._guarded(job, waited_until)
            if verdict == "ask_again":
                continue
            if verdict is not None:
                return verdict, None
            break
        rules = self.rules(job.dataset, job.route)
        if len(job.answer.body) + len(other.body) > THREAD_ABOVE:
            diff = await asyncio.to_thread(compare, job.answer, other, rules, self.token)
        else:
            diff = compare(job.answer, other, rules, self.token)
        if not diff.equal:
            return "mismatched", diff
        return "matched", None

    async def _guarded(
        self, job: Job, waited_until: float
    ) -> Outcome | Literal["ask_again"] | None:
        """None when the two answers may be compared; else why not, or ask again."""
        if self.guard is None:
            return None
        try:
            raced, lagging = await self.guard(job.dataset, job.records, job.t0)
        except StoreError:
            return "errored"
        if raced:
            return "skipped_raced"
        if not lagging:
            return None
        # The serving side answered with writes the shadowed side may not have had: wait for
        # their replay, then ask it again.
        while time.monotonic() < waited_until:
            await asyncio.sleep(_POLL)
            try:
                raced, lagging = await self.guard(job.dataset, job.records, job.t0)
            except StoreError:
                return "errored"
            if raced:
                return "skipped_raced"
            if not lagging:
                return "ask_again"
        return "skipped_lagging"

    async def _ask(self, side: Side, job: Job) -> Answer | None:
        """The answer of ``side`` to the job's request, or None when it is too large."""
        headers = [*job.headers, SHADOW_HEADER]
        limit = self.settings.max_body_bytes
        async with asyncio.timeout(self.settings.deadline):
            async with self.upstreams[side].request(
                job.method, job.target, headers, job.body
            ) as resp:
                length = resp.content_length
                if length is not None and length > limit:
                    return None
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.iter_chunks():
                    size += len(chunk)
                    if size > limit:
                        return None
                    chunks.append(chunk)
                return Answer(resp.status, CIMultiDict(resp.raw_headers), b"".join(chunks))

    # -- noise -----------------------------------------------------------------------------

    def _noise_wanted(self, job: Job) -> bool:
        if self.noise is None:
            return False
        share = self.config.dataset(job.dataset).noise_sample
        return share > 0.0 and self.rng.random() < share

    async def _noise(self, job: Job) -> None:
        """Ask the serving side again; what differs with no write in between is noise."""
        try:
            again = await self._ask(job.serving, job)
            if again is None:
                return
            if self.guard is not None:
                raced, _ = await self.guard(job.dataset, None, job.t0)
                if raced:
                    return  # a write to the dataset came in between: not an independent pair
            rules = self.rules(job.dataset, job.route)
            if len(job.answer.body) + len(again.body) > THREAD_ABOVE:
                observations = await asyncio.to_thread(
                    observe, job.answer.body, again.body, rules, self.token
                )
            else:
                observations = observe(job.answer.body, again.body, rules, self.token)
            if observations:
                await self.noise.record(job.dataset, job.route, observations)
        except (UpstreamError, TimeoutError, StoreError) as exc:
            log.info("noise pair of %s %s not taken (%s)", job.dataset, job.route, exc)


def _trace_id(span: trace.Span) -> str | None:
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None
