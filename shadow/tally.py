"""Shadow reads' outcomes, kept in memory until written: counts to Redis, errored comparisons
and mismatches to Postgres.

One process owns a replica's tally and writes it: the proxy's (inline dispatcher, or the link
to a worker process, which sends its outcomes over in the same frame that says which jobs they
belong to: :mod:`shadow.wire`). So a shadow read is counted once, whichever process dies when.
What cannot be written is kept for the next flush.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter, deque
from collections.abc import Awaitable

from bascule import metrics, telemetry
from bascule.errors import StoreError
from shadow.diff import Diff
from shadow.ledger import Ledger, Outcome

log = logging.getLogger("bascule.shadow")

EVIDENCE_CAP = 10_000
"""Mismatches kept while Postgres cannot be reached; past it each is logged as lost."""

Evidence = tuple[str, str, Diff, str | None, float | None, int]
"""(dataset, route template, diff, trace id, when it was found, stage version) of one
mismatch: epoch seconds on the state database's clock (None: not known, the time it is written
stands for it); the version of the dataset's stage the read was served under."""

Counted = tuple[str, str, Outcome, int]
"""(dataset, route template, outcome, stage version)."""
Errored = tuple[str, str, str, int]
"""(dataset, route template, reason, stage version)."""


class Tally:
    def __init__(self) -> None:
        self.counts: Counter[Counted] = Counter()
        """Outcomes for Redis (the fast per-minute counters): written by their own step."""
        self.gated: Counter[Counted] = Counter()
        """The same outcomes for Postgres (the gate's, by stage version): written, or kept,
        apart from the Redis ones, so that neither store's outage counts one twice."""
        self.writer = uuid.uuid4().hex
        self._batches: deque[tuple[int, Counter[Counted]]] = deque()
        """Gate counts taken for Postgres and not acknowledged yet, each sent again as the same
        batch (:meth:`Ledger.gate_counts` counts a batch once)."""
        self._batch = 0
        self.errors: Counter[Errored] = Counter()
        """Errored comparisons."""
        self.evidence: deque[Evidence] = deque()
        self._writing = asyncio.Lock()
        """One flush or evidence write at a time: each mismatch written once, in order, and a
        flush that follows another (a join's) waits for it."""

    def count(self, dataset: str, route: str, outcome: Outcome, version: int = 0) -> None:
        """One outcome of a read served under ``version`` of the dataset's stage."""
        self.counts[(dataset, route, outcome, version)] += 1
        self.gated[(dataset, route, outcome, version)] += 1
        _measured(dataset, route, outcome, 1)

    def error(self, dataset: str, route: str, reason: str, version: int = 0) -> None:
        self.errors[(dataset, route, reason, version)] += 1

    def mismatch(
        self,
        dataset: str,
        route: str,
        diff: Diff,
        trace_id: str | None,
        at: float | None = None,
        version: int = 0,
    ) -> None:
        m = metrics.current
        if m is not None:
            for d in diff.differences:
                m.mismatch(dataset, d.part, d.pointer, d.kind)
        # The request's trace, held by this process unsampled, is kept now (a tail decision).
        telemetry.keep_trace(trace_id)
        if len(self.evidence) < EVIDENCE_CAP:
            self.evidence.append((dataset, route, diff, trace_id, at, version))
        else:
            log.error("mismatch of %s %s not recorded: backlog full", dataset, route)

    def take(self) -> tuple[Counter[Counted], Counter[Errored], list[Evidence]]:
        """Everything held, handed over (a worker's report), and forgotten here."""
        taken = self.counts, self.errors, list(self.evidence)
        self.counts, self.gated, self.errors = Counter(), Counter(), Counter()
        self._batches.clear()
        self.evidence.clear()
        return taken

    def add(
        self, counts: Counter[Counted], errors: Counter[Errored], evidence: list[Evidence]
    ) -> None:
        self.counts.update(counts)
        self.gated.update(counts)
        for (dataset, route, outcome, _), n in counts.items():
            _measured(dataset, route, outcome, n)
        self.errors.update(errors)
        for item in evidence:
            self.mismatch(*item)

    def held(self) -> str:
        """What is held, in words, for a log line."""
        return (
            f"{self._gated_held()} counts, {sum(self.errors.values())} errored "
            f"comparisons, {len(self.evidence)} mismatches"
        )

    async def write_evidence(self, ledger: Ledger) -> None:
        """The mismatches held, to Postgres, oldest first; raises StoreError when it cannot."""
        await asyncio.shield(self._locked(self._write_evidence(ledger)))

    async def flush(self, ledger: Ledger, *, postgres: bool = True) -> None:
        """Errored counts and mismatches to Postgres (``postgres``: the gate's evidence
        first), then counts to Redis. What cannot be written is kept; a Postgres failure is
        raised once the counts are written.

        Flushes and evidence writes run one at a time, and a caller cancelled meanwhile (a
        stop) does not cancel the write under way: what a write took out of the tally is
        either written or put back, and the next flush waits for it."""
        await asyncio.shield(self._locked(self._flush(ledger, postgres)))

    async def last_flush(self, ledger: Ledger, *, postgres: bool = True) -> None:
        """The flush of a stop: what it cannot write is lost with the process, and said."""
        try:
            await self.flush(ledger, postgres=postgres)
        except Exception as exc:
            log.error(
                "shadow outcomes not written at stop (%s): %s lost", type(exc).__name__, self.held()
            )

    def _gated_held(self) -> int:
        return sum(self.gated.values()) + sum(sum(c.values()) for _, c in self._batches)

    async def _locked(self, work: Awaitable[None]) -> None:
        async with self._writing:
            await work

    async def _write_evidence(self, ledger: Ledger) -> None:
        while self.evidence:
            dataset, route, diff, trace_id, at, version = self.evidence[0]
            await ledger.mismatch(
                dataset, route, diff, trace_id, count=False, at=at, version=version
            )
            self.evidence.popleft()

    async def _flush(self, ledger: Ledger, postgres: bool) -> None:
        failure: StoreError | None = None
        if postgres:
            errors, self.errors = self.errors, Counter()
            if self.gated:
                self._batch += 1
                self._batches.append((self._batch, self.gated))
                self.gated = Counter()
            try:
                if errors:
                    await ledger.errors(errors)
            except BaseException as exc:
                self.errors.update(errors)
                if not isinstance(exc, StoreError):
                    raise
                failure = exc
            while self._batches and failure is None:
                batch, gated = self._batches[0]
                try:
                    await ledger.gate_counts(gated, writer=self.writer, batch=batch)
                except StoreError as exc:
                    failure = exc  # kept, sent again as this same batch
                    break
                self._batches.popleft()
            if failure is None:
                try:
                    await self._write_evidence(ledger)
                except StoreError as exc:
                    failure = exc
        else:
            self.gated.clear()  # this tally's evidence is written by another process's
            self._batches.clear()
        counts, self.counts = self.counts, Counter()
        if counts and not await ledger.count_many(counts):
            self.counts.update(counts)
        if failure is not None:
            raise failure


def _measured(dataset: str, route: str, outcome: Outcome, n: int) -> None:
    """Shadow-read outcomes as metrics (``bascule/metrics.py``), in the proxy's process only
    (a worker process has none: its proxy counts what it reports)."""
    m = metrics.current
    if m is None or outcome == "compared":  # compared = matched + mismatched
        return
    label = m.dataset(dataset)
    m.comparisons.add(
        n, {"bascule.dataset": label, "http.route": route, "bascule.outcome": outcome}
    )
    if outcome == "dropped":
        m.dropped.add(n, {"bascule.dataset": label})
