"""The tally of shadow outcomes: written once whatever cancels its writer, one flush at a time,
the gate's evidence (Postgres) before the counters (Redis), and nothing dropped on a failure."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import pytest

from bascule.errors import StoreError
from bascule.tasks import spawn
from shadow.diff import Diff, Difference
from shadow.tally import Tally

DIFF = Diff((Difference("body", "/record/amount", "changed"),))


class Ledger:
    """Writes only once ``release`` is set; ``fail_postgres`` makes Postgres refuse."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.fail_postgres = False
        self.counts: Counter[Any] = Counter()
        self.errors_: Counter[Any] = Counter()
        self.gated: Counter[Any] = Counter()
        self.rows: list[tuple[str, str]] = []
        self.order: list[str] = []
        self.batches: list[tuple[str, int]] = []

    async def count_many(self, counts: Any) -> bool:
        await self.release.wait()
        self.counts.update(counts)
        self.order.append("redis")
        return True

    async def _postgres(self) -> None:
        await self.release.wait()
        if self.fail_postgres:
            raise StoreError("the state Postgres is away")
        self.order.append("postgres")

    async def errors(self, errors: Any) -> None:
        await self._postgres()
        self.errors_.update(errors)

    async def gate_counts(self, counts: Any, *, writer: str, batch: int) -> None:
        await self._postgres()
        self.batches.append((writer, batch))
        self.gated.update(counts)

    async def mismatch(self, dataset: str, route: str, diff: Diff, trace_id: Any, **_: Any) -> None:
        await self._postgres()
        self.rows.append((dataset, route))


def filled() -> Tally:
    tally = Tally()
    for _ in range(3):
        tally.count("dcir", "/r", "errored")
        tally.error("dcir", "/r", "shadow_timeout")
    tally.count("dcir", "/r", "mismatched")
    tally.mismatch("dcir", "/r", DIFF, None)
    return tally


async def test_a_cancelled_flush_still_writes_what_it_took_once() -> None:
    tally, ledger = filled(), Ledger()
    first = spawn(tally.flush(ledger), name="first")  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    first.cancel()  # a stop cancelling the housekeeping mid-write
    with pytest.raises(asyncio.CancelledError):
        await first
    final = spawn(tally.flush(ledger), name="final")  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not final.done()  # it waits for the write under way
    ledger.release.set()
    await final
    assert ledger.errors_ == {("dcir", "/r", "shadow_timeout", 0): 3}
    assert ledger.rows == [("dcir", "/r")]  # once, not again by the final flush
    counted = {("dcir", "/r", "errored", 0): 3, ("dcir", "/r", "mismatched", 0): 1}
    assert ledger.counts == counted  # Redis's
    assert ledger.gated == counted  # and the gate's, once each
    assert tally.held() == "0 counts, 0 errored comparisons, 0 mismatches"


async def test_the_evidence_goes_first_and_a_postgres_failure_keeps_it() -> None:
    tally, ledger = filled(), Ledger()
    ledger.release.set()
    ledger.fail_postgres = True
    with pytest.raises(StoreError):
        await tally.flush(ledger)  # type: ignore[arg-type]
    # Counts still reach Redis; errored comparisons, the gate's counts and the mismatch are
    # kept for later.
    assert sum(ledger.counts.values()) == 4 and not tally.counts
    assert tally.held() == "4 counts, 3 errored comparisons, 1 mismatches"
    ledger.fail_postgres = False
    tally.count("dcir", "/r", "matched")
    await tally.flush(ledger)  # type: ignore[arg-type]
    assert ledger.errors_ == {("dcir", "/r", "shadow_timeout", 0): 3}
    assert sum(ledger.gated.values()) == 5  # each once, the kept ones with the new one
    assert ledger.rows == [("dcir", "/r")]
    # The kept batch is sent again as itself (an idempotent retry), then the new one.
    assert [b for _, b in ledger.batches] == [1, 2] and len({w for w, _ in ledger.batches}) == 1
    assert ledger.order == ["redis", "postgres", "postgres", "postgres", "postgres", "redis"]


async def test_evidence_writers_take_turns() -> None:
    """Workers writing mismatches as they find them, and a flush, at once: each row once."""
    tally, ledger = Tally(), Ledger()
    for _ in range(5):
        tally.mismatch("dcir", "/r", DIFF, None)
    writers = [
        spawn(tally.write_evidence(ledger), name=f"w{i}")  # type: ignore[arg-type]
        for i in range(4)
    ]
    writers.append(spawn(tally.flush(ledger), name="flush"))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    writers[0].cancel()
    ledger.release.set()
    for task in writers:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert len(ledger.rows) == 5
