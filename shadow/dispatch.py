"""Shadow reads: a sampled read re-sent to the shadowed side, off the researcher's path, and
compared with the answer the researcher got.

The researcher's answer is never held back: the proxy hands the request and the serving side's
answer to :meth:`Dispatcher.submit` once it has answered, and a worker does the rest. Shadow
reads have their own connection pools (so a slow shadowed side cannot take the connections
writes and replays need), their own deadline, a bounded number in flight and a bounded memory
budget; a shadow read that does not fit is dropped and counted ``dropped``.

**Race guard.** The proxy notes ``t0`` before the serving side is asked, and each shadow read
notes ``t1`` before it is sent, both on the state database's clock (estimated locally, never a
round trip on the researcher's path: :class:`DbClock`). Two answers that agree are a match,
whatever was written meanwhile. When they differ, the race guard
(:meth:`bascule.state.journal.guard.RaceGuard.race`) says from the journal whether a write to
the record read (or, for a read that names none, to the dataset) may be in one answer and not
the other (*raced*), is in the serving answer but reached the other side too late (*lagging*:
wait for its replay, then ask again; past ``lag_wait``, *skipped: lagging*), or cannot reach it
by itself (a dead entry: *skipped: lagging* at once). Only a difference the guard calls *clear*
is a mismatch. Every rule errs toward skipping, never toward a false mismatch.

**What counts.** ``compared`` = ``matched`` + ``mismatched``. A serving side that failed
(5xx, 408, 429) is ``skipped_unavailable``: nothing to compare. A shadowed side that failed,
timed out or answered more than ``max_body_bytes`` is ``errored``, and errored comparisons are
also counted in Postgres per minute and reason (``bascule_shadow_error``), like mismatches: the
gate's evidence survives a Redis restart. Evidence that cannot be written is kept and retried.

**Noise.** On ``noise_sample`` of shadow reads the serving side is asked a second time; if no
write to the dataset was decided in between, what differs between its two answers is noise,
recorded as observations (:mod:`shadow.noise`) an SRE may accept as rules.

Nothing here logs, traces or counts a value: counters, classes, pointers and kinds only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import msgspec
from multidict import CIMultiDict
from opentelemetry import trace

from bascule import telemetry
from bascule.config import Backend, CompareRules, Config, ShadowSettings
from bascule.errors import StoreError, UpstreamError, UpstreamTimeout
from bascule.stages import Side
from bascule.state.journal.guard import Guarded
from bascule.tasks import spawn
from bascule.upstream import Upstream
from shadow.compare import Answer, Rules, compare, compile_rules
from shadow.diff import Diff
from shadow.ledger import Ledger, Outcome
from shadow.noise import merge, observe
from shadow.tally import Tally

log = logging.getLogger("bascule.shadow")

SHADOW_HEADER = ("X-Bascule-Shadow", "1")
DECODABLE = frozenset({"gzip", "x-gzip", "deflate", "identity"})
"""Content codings a captured answer can be decoded from (zlib, in the standard library)."""
CONDITIONAL = frozenset(
    {"if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "if-range"}
)
"""Not sent on a shadow read: the other side would answer 304 or 412 to what it never served."""
THREAD_ABOVE = 256 * 1024
"""Answers larger than this are compared in a worker thread, so the event loop keeps serving."""
BIG = 1024 * 1024
"""Shadow reads of answers larger than this run two at a time (memory: both answers and their
parsed trees are held while they are compared)."""
_POLL_FIRST, _POLL_MAX = 0.02, 0.32

Verdict = Literal["clear", "raced", "stuck", "lagging"]
Guard = Callable[..., Awaitable[Guarded]]
""":meth:`bascule.state.journal.guard.RaceGuard.race`."""


def unavailable(status: int) -> bool:
    """An answer that says the side could not answer, rather than what it holds."""
    return status >= 500 or status in (408, 429)


@dataclass(frozen=True, slots=True)
class Job:
    """One shadow read: the researcher's request and the answer the serving side gave."""

    dataset: str
    route: str
    """The route template: never the concrete path."""
    method: str
    target: str
    headers: Sequence[tuple[str, str]]
    """The researcher's end-to-end headers (``Authorization`` included: the other side
    authorizes the read as the serving side did), never logged."""
    body: bytes
    serving: Side
    shadowed: Side
    answer: Answer
    t0: float
    """Before the serving side was asked, on the state database's clock (epoch seconds)."""
    records: tuple[str, ...] | None
    """Record tokens the read depends on (its own and ``*``), or None for the whole dataset."""
    traceparent: str | None = None
    seq: int = 0
    """Its number on the link from the proxy to a worker process (:mod:`shadow.link`)."""
    version: int = 0
    """The version of the dataset's stage the read was served under: its outcome counts as
    that stage's evidence (the gate's)."""

    @property
    def size(self) -> int:
        return len(self.answer.body) + len(self.body)


JobDone = Callable[[Job], None]
"""Told of each job once its outcome is counted (dropped ones included)."""


class Shadows(Protocol):
    """What the researcher's path asks of shadow reads: a :class:`Dispatcher` in the proxy's
    own event loop, or the link to a worker process (:class:`shadow.link.ShadowLink`)."""

    settings: ShadowSettings

    def wanted(self, dataset: str) -> bool: ...

    def now(self) -> float: ...

    def room(self) -> int: ...

    def submit(self, job: Job) -> None: ...

    def count(self, dataset: str, route: str, outcome: Outcome, version: int) -> None: ...

    async def reconfigure(self, config: Config) -> None: ...


def shadow_backend(backend: Backend, settings: ShadowSettings) -> Backend:
    """A backend as shadow reads call it: a pool of their own (``concurrency`` connections,
    so a slow shadowed side never takes the researchers'), silent ``deadline`` at most."""
    return msgspec.structs.replace(
        backend, pool_size=settings.concurrency, read_timeout=settings.deadline
    )


class DbClock:
    """The state database's clock, estimated locally: a monotonic reading plus the offset
    measured by :meth:`calibrate` (a round trip, off the researcher's path), less half that
    round trip, a margin, and a drift allowance that grows until the next calibration. The
    estimate is never later than the database's time, so writes decided just before it are
    taken as raced: the safe side. Monotonic, so a step of the host's wall clock changes
    nothing; until the first calibration there is no estimate at all."""

    MARGIN = 0.010
    DRIFT = 0.001
    """Seconds per second the two clocks may drift apart (NTP slews at most 0.0005)."""

    def __init__(self) -> None:
        self.offset: float | None = None
        self.error = 0.0
        self.at = 0.0

    @property
    def calibrated(self) -> bool:
        return self.offset is not None

    async def calibrate(self, pool: Any) -> None:
        before = time.monotonic()
        db = await pool.fetchval(
            "SELECT extract(epoch FROM clock_timestamp())::float8", timeout=2.0
        )
        after = time.monotonic()
        self.offset = float(db) - (before + after) / 2
        self.error = (after - before) / 2
        self.at = after

    def now(self) -> float | None:
        if self.offset is None:
            return None
        mono = time.monotonic()
        drift = (mono - self.at) * self.DRIFT
        return mono + self.offset - self.error - self.MARGIN - drift


class Sampling:
    """Which reads to shadow, and ``t0``: the researcher's side of a :class:`Dispatcher` and of
    the link to a worker process (:class:`shadow.link.ShadowLink`) alike."""

    config: Config
    rng: random.Random
    clock: DbClock
    clock_pool: Any
    """The state database, whose clock ``t0`` and ``t1`` are read from (None: none)."""

    def wanted(self, dataset: str) -> bool:
        """Whether to shadow-read this read (sampled per dataset). Not before the database
        clock is known: without it no read could be guarded."""
        share = self.config.dataset(dataset).shadow_sample
        if share <= 0.0 or (share < 1.0 and self.rng.random() >= share):
            return False
        return self.clock.calibrated

    def now(self) -> float:
        now = self.clock.now()
        assert now is not None, "wanted() said no before the clock was calibrated"
        return now

    async def calibrate(self) -> None:
        """Measure the state database's clock (a failure is logged; the next tick retries)."""
        if self.clock_pool is None:
            return
        try:
            await self.clock.calibrate(self.clock_pool)
        except Exception as exc:
            log.warning("state database clock not measured (%s)", type(exc).__name__)

    async def flush(self) -> None:
        raise NotImplementedError

    async def _every_ten_seconds(self) -> None:
        """What else the housekeeping does every 10 s."""

    async def _housekeeping(self) -> None:
        """The tally flushed every second; the clock measured every 10 s (every second until
        it is known), with :meth:`_every_ten_seconds`."""
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            try:
                if tick % 10 == 0 or not self.clock.calibrated:
                    await self.calibrate()
                if tick % 10 == 0:
                    await self._every_ten_seconds()
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # kept for the next tick (StoreError...): it retries
                log.warning("shadow housekeeping: %s", type(exc).__name__)


class Dispatcher(Sampling):
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
        done: JobDone | None = None,
    ) -> None:
        """``upstreams``: the shadow reads' own pools, one per side. ``guard``: the journal's
        race check (None when this replica has no journal: it then accepts no write in a
        stage that shadows, so nothing can race). ``clock_pool``: the state database, for
        :class:`DbClock` and the errored counts. ``noise``: a :class:`shadow.noise_store.NoiseStore`
        (None: no noise learning). ``done``: told of each job once it is counted."""
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
        self.done = done
        self._queue: asyncio.Queue[Job] = asyncio.Queue(self.settings.queue)
        self._bytes = 0
        """Bytes of the jobs queued or in flight, and of the shadowed answers held."""
        self.budget = 4 * self.settings.max_body_bytes
        self._big = asyncio.Semaphore(2)
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bascule-compare")
        self.tally = Tally()
        """Outcomes not yet written; with ``done`` (a worker process), its proxy writes them."""
        self._reasons: dict[int, str] = {}
        """Why a job in flight is errored, by id(job), until its outcome is recorded."""
        self._rules: dict[tuple[str, str], Rules] = {}
        self._accepted: dict[str, dict[str, tuple[tuple[str, ...], dict[str, str]]]] = {}
        # Read routes only: a write route on the same path never carries comparison rules.
        self._routes = {r.path: r for r in config.routes if r.kind == "read"}
        self._creates = tuple(
            f"{method} {r.path}" for r in config.routes if r.create_id for method in r.methods
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._noise_version: Any = None

    async def reconfigure(self, config: Config) -> None:
        """A reload (SIGHUP): comparison rules, sampling, deadlines and the backends'
        timeouts from ``config``, for the reads compared from now on (the checked reload
        changes nothing else: queue and concurrency stay)."""
        self.config = config
        self.settings = config.shadow
        self._routes = {r.path: r for r in config.routes if r.kind == "read"}
        self._rules = {}
        for side, backend in (
            (Side.SOURCE, config.source_backend),
            (Side.TARGET, config.target_backend),
        ):
            upstream = self.upstreams.get(side)
            if upstream is not None:
                upstream.retime(shadow_backend(backend, config.shadow))

    # -- the researcher's path -------------------------------------------------------------

    def room(self) -> int:
        """Bytes a new shadow read may hold now."""
        return max(0, self.budget - self._bytes)

    def submit(self, job: Job) -> None:
        """Queue a shadow read; never waits. Full (in entries or bytes), or stopping:
        dropped, counted."""
        size = job.size
        if self._stopping.is_set() or self._bytes + size > self.budget:
            return self._dropped(job)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            return self._dropped(job)
        self._bytes += size

    def _dropped(self, job: Job) -> None:
        self._record(job, "dropped")

    def count(self, dataset: str, route: str, outcome: Outcome, version: int) -> None:
        """Counted in memory, flushed to the ledger about once a second (one pipeline)."""
        self.tally.count(dataset, route, outcome, version)

    def errored(self, job: Job, reason: str) -> Outcome:
        """The outcome ``errored``, and why: counted in Postgres too once it is recorded."""
        self._reasons[id(job)] = reason
        return "errored"

    def _record(
        self, job: Job, outcome: Outcome, diff: Diff | None = None, trace_id: str | None = None
    ) -> None:
        """A job's one outcome, counted; told to ``done`` in the same step, so that a worker's
        report never has one without the other."""
        reason = self._reasons.pop(id(job), None)
        self.tally.count(job.dataset, job.route, outcome, job.version)
        if outcome in ("matched", "mismatched"):
            self.tally.count(job.dataset, job.route, "compared", job.version)
        elif outcome == "errored":
            self.tally.error(job.dataset, job.route, reason or "internal", job.version)
        if diff is not None:
            self.tally.mismatch(
                job.dataset, job.route, diff, trace_id, self.clock.now(), job.version
            )
        if self.done is not None:
            self.done(job)

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.calibrate()
        await self._reload_noise_rules()
        self._tasks = [
            spawn(self._worker(), name=f"shadow-{i}") for i in range(self.settings.concurrency)
        ]
        self._tasks.append(spawn(self._housekeeping(), name="shadow-housekeeping"))
        if self.noise is not None:
            # Decisions heard on Redis at once; the housekeeping's poll of Postgres covers
            # Redis being away.
            self._tasks.append(
                spawn(self.noise.listen(self._noise_decided, self._stopping), name="noise-listen")
            )

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            # redis-py can swallow a cancellation that lands inside its read timeout
            # (redis/redis-py#2028): cancel until the task has really ended.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        while not self._queue.empty():  # never run: say so
            self._dropped(self._queue.get_nowait())
            self._queue.task_done()
        if self.done is None:  # in a worker process, its proxy writes the tally
            await self.tally.last_flush(self.ledger, postgres=self.clock_pool is not None)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def join(self) -> None:
        """Until every queued shadow read is done, and its counts flushed (tests, shutdown)."""
        await self._queue.join()
        await self.flush()

    async def flush(self) -> None:
        """Counters to Redis; errored counts and any mismatch not yet recorded to Postgres.
        What cannot be written is kept for the next flush. In a worker process (``done``),
        nothing: the tally goes to the proxy, which writes it."""
        if self.done is None:
            await self.tally.flush(self.ledger, postgres=self.clock_pool is not None)

    async def _every_ten_seconds(self) -> None:
        await self._reload_noise_rules()

    async def _noise_decided(self, dataset: str | None) -> None:
        await self._reload_noise_rules()

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
        """The read route's rules (or its dataset's), with the noise rules SREs accepted."""
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
            recorded = False
            try:
                async with self._big if job.size > BIG else contextlib.nullcontext():
                    served, outcome, diff, trace_id = await self.run(job)
                    self._record(job, outcome, diff, trace_id)
                    recorded = True
                    if diff is not None and self.done is None:
                        await self._write_evidence()
                    # Whatever the comparison gave: noise makes answers differ on their own.
                    if served is not None and self._noise_wanted(job):
                        await self._noise(job, served)
            except asyncio.CancelledError:
                if not recorded:  # stopping with this read in flight: it has no outcome
                    self._record(job, "dropped")
                raise
            except Exception as exc:
                # The class only: a message could quote what a backend answered.
                log.error("shadow read of %s %s failed: %s", job.dataset, job.route, type(exc))
                if not recorded:
                    self._record(job, self.errored(job, "internal"))
            finally:
                self._reasons.pop(id(job), None)
                self._bytes -= job.size
                self._queue.task_done()

    async def _write_evidence(self) -> None:
        """A mismatch to Postgres as soon as it is found; kept for the next flush if not."""
        with contextlib.suppress(StoreError):
            await self.tally.write_evidence(self.ledger)

    async def run(self, job: Job) -> tuple[Answer | None, Outcome, Diff | None, str | None]:
        """Shadow-read, guard and compare one job: the serving answer uncoded (None when it
        cannot be), the outcome, the diff of a mismatch and the trace id. Nothing counted."""
        parent = telemetry.context_of(job.traceparent)
        with telemetry.tracer().start_as_current_span(
            telemetry.SHADOW_SPAN,
            context=parent,
            kind=trace.SpanKind.INTERNAL,
            attributes={
                telemetry.DATASET: job.dataset,
                telemetry.ROUTE: job.route,
                telemetry.ORIGIN: job.shadowed.value,
            },
            record_exception=False,
        ) as span:
            # Uncoded once, for the comparison and for a noise pair alike.
            served = _decoded(job.answer, self.settings.max_body_bytes)
            outcome, diff = await self._outcome(job, served)
            span.set_attribute(telemetry.OUTCOME, outcome)
            trace_id = _trace_id(span)
            if outcome == "errored":
                span.set_status(telemetry.ERROR)
            if diff is not None:
                span.set_attribute("bascule.diff.count", len(diff.differences) + diff.truncated)
        return served, outcome, diff, trace_id

    async def _outcome(self, job: Job, served: Answer | None) -> tuple[Outcome, Diff | None]:
        if served is None:
            return self.errored(job, "serving_coding"), None
        waited_until = time.monotonic() + self.settings.lag_wait
        while True:
            t1 = self.clock.now()
            if t1 is None:
                return self.errored(job, "clock"), None
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
                late = isinstance(exc, TimeoutError | UpstreamTimeout)
                return self.errored(job, "shadow_timeout" if late else "shadow_unreachable"), None
            if other is None:
                # Larger than anything compared while the serving answer was not: never
                # silently skipped, since sizes that far apart say the data may differ.
                return self.errored(job, "shadow_too_large"), None
            if unavailable(other.status) and not unavailable(served.status):
                return self.errored(job, f"shadow_status_{other.status // 100}xx"), None
            self._bytes += len(other.body)
            try:
                rules = self.rules(job.dataset, job.route)
                with telemetry.tracer().start_as_current_span(
                    telemetry.COMPARE_SPAN,
                    attributes={telemetry.DATASET: job.dataset, telemetry.ROUTE: job.route},
                    record_exception=False,
                ) as compared:
                    if len(served.body) + len(other.body) > THREAD_ABOVE:
                        loop = asyncio.get_running_loop()
                        diff = await loop.run_in_executor(
                            self._executor, compare, served, other, rules, self.token
                        )
                    else:
                        diff = compare(served, other, rules, self.token)
                    compared.set_attribute("bascule.equal", diff.equal)
                    if not diff.equal:
                        verdict = await self._guarded(job, t1, served, other, waited_until)
                        compared.set_attribute("bascule.guard", verdict)
                        if verdict == "clear":
                            # Pointers and kinds: never a value.
                            compared.add_event(
                                telemetry.DIVERGENCE,
                                {
                                    "bascule.pointers": [
                                        f"{d.part}:{d.pointer}" for d in diff.differences[:50]
                                    ],
                                    "bascule.kinds": [d.kind for d in diff.differences[:50]],
                                    "bascule.count": len(diff.differences) + diff.truncated,
                                },
                            )
                if diff.equal:
                    # The two sides said the same thing: a match whatever wrote meanwhile. The
                    # guard only ever stands between a difference and a mismatch.
                    return "matched", None
            finally:
                self._bytes -= len(other.body)
            if verdict == "ask_again":
                continue
            if verdict != "clear":
                return verdict, None
            return "mismatched", diff

    async def _guarded(
        self, job: Job, t1: float, served: Answer, other: Answer, waited_until: float
    ) -> Outcome | Literal["clear", "ask_again"]:
        """Whether the two answers may be compared; else why not, or ask again."""
        if self.guard is None:
            return "clear"
        # A create makes a record that did not exist: never one both sides already hold.
        both_hold = job.records is not None and served.status < 300 and other.status < 300
        creates = self._creates if both_hold else ()
        verdict = await self._verdict(job, t1, creates)
        poll = _POLL_FIRST
        while verdict == "lagging":
            # In the serving answer, not on the other side when it was asked: wait for the
            # replay (backing off), then ask again — the answer in hand predates it.
            if time.monotonic() + poll > waited_until:
                return "skipped_lagging"
            await asyncio.sleep(poll)
            poll = min(poll * 2, _POLL_MAX)
            now = self.clock.now()
            if now is None:
                return self.errored(job, "clock")
            verdict = await self._verdict(job, now, creates)
            if verdict == "clear":
                return "ask_again"
        if verdict == "raced":
            return "skipped_raced"
        if verdict == "stuck":
            return "skipped_lagging"  # a dead entry: its replay will not come by itself
        return verdict  # clear, or errored

    async def _verdict(
        self, job: Job, t1: float, creates: tuple[str, ...]
    ) -> Guarded | Literal["errored"]:
        assert self.guard is not None
        try:
            return await self.guard(
                job.dataset,
                job.records,
                t0=job.t0,
                t1=t1,
                serving=job.serving.value,
                creates=creates,
            )
        except (StoreError, TimeoutError):
            self.errored(job, "guard_unavailable")
            return "errored"

    async def _ask(self, side: Side, job: Job) -> Answer | None:
        """The answer of ``side`` to the job's request, uncoded, or None when too large."""
        headers = [
            (k, v)
            for k, v in job.headers
            if k.lower() not in CONDITIONAL and k.lower() != "accept-encoding"
        ]
        headers += [("Accept-Encoding", "identity"), SHADOW_HEADER]
        limit = self.settings.max_body_bytes
        async with asyncio.timeout(self.settings.deadline):
            async with self.upstreams[side].request(
                job.method, job.target, headers, job.body, role="shadow"
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
                answer = Answer(resp.status, CIMultiDict(resp.raw_headers), b"".join(chunks))
        return _decoded(answer, limit)

    # -- noise -----------------------------------------------------------------------------

    def _noise_wanted(self, job: Job) -> bool:
        if self.noise is None or unavailable(job.answer.status):
            return False
        share = self.config.dataset(job.dataset).noise_sample
        return share > 0.0 and self.rng.random() < share

    async def _noise(self, job: Job, served: Answer) -> None:
        """Ask the serving side again; what differs with no write in between is noise."""
        try:
            again = await self._ask(job.serving, job)
            if again is None or unavailable(again.status):
                return
            if self.guard is not None:
                now = self.clock.now()
                if now is None:
                    return
                verdict = await self.guard(
                    job.dataset, None, t0=job.t0, t1=now, serving=job.serving.value
                )
                if verdict == "raced":
                    return  # a write to the dataset came in between: not an independent pair
            rules = self.rules(job.dataset, job.route)
            if len(served.body) + len(again.body) > THREAD_ABOVE:
                loop = asyncio.get_running_loop()
                observations = await loop.run_in_executor(
                    self._executor, observe, served.body, again.body, rules, self.token
                )
            else:
                observations = observe(served.body, again.body, rules, self.token)
            if observations:
                await self.noise.record(job.dataset, job.route, observations)
        except (UpstreamError, TimeoutError, StoreError) as exc:
            log.info("noise pair of %s %s not taken (%s)", job.dataset, job.route, type(exc))


def _decoded(answer: Answer, limit: int) -> Answer | None:
    """``answer`` with its body uncoded (gzip, deflate), the coding headers dropped; None when
    its coding is unknown or it decodes to more than ``limit`` bytes."""
    coding = answer.headers.get("Content-Encoding", "identity").strip().lower()
    if coding == "identity":
        return answer
    if coding not in DECODABLE:
        return None
    try:
        wbits = 16 + zlib.MAX_WBITS if coding in ("gzip", "x-gzip") else zlib.MAX_WBITS
        inflater = zlib.decompressobj(wbits)
        body = inflater.decompress(answer.body, limit + 1)
        if len(body) > limit or inflater.unconsumed_tail:
            return None
    except zlib.error:
        return None
    headers = CIMultiDict(
        (k, v)
        for k, v in answer.headers.items()
        if k.lower() not in ("content-encoding", "content-length")
    )
    return replace(answer, headers=headers, body=body)


def _trace_id(span: trace.Span) -> str | None:
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None
