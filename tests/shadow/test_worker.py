"""Shadow reads in their worker process (``[shadow] worker = "process"``, the default): found
divergence, CPU priority, a worker killed mid-flight, a proxy stopped with reads queued, and
no planted value in what the worker logs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from bascule.state.postgres import open_pool
from refapi.lab import AUTH
from shadow import link as link_module
from shadow.ledger import Ledger
from shadow.link import ShadowLink
from tests.conftest import Ground
from tests.harness import Forward, late
from tests.world import LIVE, PLANTED, Hooks, World, get, planted_divergence_is_found, shadow_world

pytestmark = pytest.mark.timeout(180)


def link_of(world: World) -> ShadowLink:
    assert isinstance(world.replica.shadow, ShadowLink)
    return world.replica.shadow


async def reads(world: World, ids: range, concurrency: int = 8) -> None:
    """One read of each record, all answered by the serving side."""
    base = f"{world.proxy}/v1/datasets/dcir/records"
    todo = list(ids)

    async def reader() -> None:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            while todo:
                assert await get(session, f"{base}/{todo.pop()}") == 200

    await asyncio.gather(*(reader() for _ in range(concurrency)))


Worlds = Callable[..., AbstractAsyncContextManager[World]]
Counts = Callable[[float], Awaitable[Any]]

SLOW = {"extra": "[shadow]\nconcurrency = 4\ndeadline = 10.0\n", "hooks": Hooks(target=late())}
"""The target answers 2 s late: every shadow read stays in the worker a while (4 in flight,
the others queued)."""


@pytest.fixture
def worlds(ground: Ground) -> Worlds:
    """:func:`shadow_world` over this test's stores; shadow reads in a worker process unless
    ``shadow_worker`` says otherwise."""

    def build(**options: Any) -> AbstractAsyncContextManager[World]:
        options.setdefault("shadow_worker", "process")
        return shadow_world(ground, **options)

    return build


async def test_divergence_is_found_through_the_worker_process(worlds: Worlds) -> None:
    async with worlds() as world:
        link = link_of(world)
        assert link.pid is not None and link.pid != os.getpid()
        await planted_divergence_is_found(world)
        # The trace context crossed to the worker: each mismatch's trace id is the one the
        # serving side got with the researcher's read, and the shadowed side with the worker's.
        traces = {t for m in await world.mismatches() for t in m["trace_ids"]}
        sent = [
            {r.traceparent.split("-")[1] for r in api.received if r.traceparent}
            for api in (world.source, world.target)
        ]
    assert traces and traces <= sent[0] & sent[1], (traces, sent)


@pytest.mark.parametrize(
    ("priority", "policy", "nice"), [("idle", "SCHED_IDLE", 0), ("low", "SCHED_OTHER", 19)]
)
async def test_the_worker_runs_at_its_priority_in_every_thread(
    worlds: Worlds,
    priority: str,
    policy: str,
    nice: int,
) -> None:
    async with worlds(
        extra=f'[shadow]\npriority = "{priority}"\n',
    ) as world:
        await reads(world, range(1, 30))  # big enough to be compared in its threads too
        await world.settled()
        pid = link_of(world).pid
        assert pid is not None
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        assert {os.sched_getscheduler(t) for t in threads} == {getattr(os, policy)}
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {nice}
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the proxy's own: unchanged


async def test_a_killed_worker_is_replaced_and_the_reads_it_held_are_counted(
    worlds: Worlds,
) -> None:
    """The target answers 2 s late, so that every shadow read is still in the worker when it
    is killed: all are counted dropped, researchers are served meanwhile, and a new worker
    compares the reads after it."""
    async with worlds(**SLOW) as world:
        link = link_of(world)
        first = link.pid
        assert first is not None
        await reads(world, range(1, 31))
        await asyncio.sleep(0.3)  # the last job handed over
        os.kill(first, signal.SIGKILL)
        await reads(world, range(31, 41))  # no worker: served all the same
        deadline = time.monotonic() + 30
        while link.pid in (None, first):
            assert time.monotonic() < deadline, "no new shadow worker"
            await asyncio.sleep(0.05)
        assert link.restarts == 1
        await reads(world, range(41, 45))
        counts = await world.settled()
    assert counts["matched"] + counts["dropped"] == 44, counts
    assert counts["dropped"] >= 30, counts  # what the dead worker held, at least
    assert counts["matched"] >= 4, counts  # the new worker's
    assert counts["mismatched"] == counts["errored"] == 0, counts


async def test_a_stopping_proxy_stops_its_worker_and_counts_what_it_held(
    worlds: Worlds, ledger_counts: Counts
) -> None:
    async with worlds(**SLOW) as world:
        pid = link_of(world).pid
        assert pid is not None
        await reads(world, range(1, 13))
        await asyncio.sleep(0.3)
        started = time.monotonic()
    assert time.monotonic() - started < 10  # not the kill after STOP_WAIT
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # ended and reaped
    counts = await ledger_counts(world.started)
    # 4 in flight (cancelled) and 8 queued: none has an outcome, every one is counted.
    assert counts["dropped"] == 12, counts
    assert counts["compared"] == 0, counts


async def test_the_worker_logs_no_planted_value(
    worlds: Worlds,
    pg_url: str,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At DEBUG, with mismatches, a killed and restarted worker: its log (the proxy's stderr)
    names no planted value, and the mismatches it recorded carry none."""
    # The root logger at DEBUG for this test only (caplog restores it): left at DEBUG, every
    # later test on this worker logged aiohttp's access lines, URLs and query strings included.
    caplog.set_level(logging.DEBUG)
    async with worlds() as world:
        await world.sql(
            world.target_db, "UPDATE dcir SET patient_id = $1 WHERE id IN (3, 4)", PLANTED
        )
        await reads(world, range(1, 9))
        counts = await world.settled()
        assert counts["mismatched"] == 2, counts
        link = link_of(world)
        first = link.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        while link.pid in (None, first):
            await asyncio.sleep(0.05)
        await reads(world, range(1, 9))
        counts = await world.settled()
        assert counts["mismatched"] == 4, counts
    conn = await asyncpg.connect(pg_url)
    try:
        rows = [r["row"] for r in await conn.fetch("SELECT m::text AS row FROM bascule_mismatch m")]
    finally:
        await conn.close()
    out, err = capfd.readouterr()
    assert err.count("bascule.shadow.worker") >= 2  # its log is there: both workers
    for where, text in {"log": out + err, "mismatches": "\n".join(rows)}.items():
        assert PLANTED not in text, f"planted value in the worker's {where}"


@pytest.fixture
def ledger_counts(pg_url: str, redis_url: str, redis_prefix: str) -> Counts:
    """dcir's counts in the ledger since a time, read after the world is gone."""

    async def counts(since: float) -> Any:
        pool = await open_pool(pg_url, max_size=1)
        redis = aioredis.Redis.from_url(redis_url)
        try:
            return await Ledger(pool, redis, redis_prefix).counts("dcir", since)
        finally:
            await redis.aclose()
            await pool.close()

    return counts


async def down(request: web.Request, forward: Forward) -> web.Response:
    """A shadowed side that answers 503 to everything: every comparison is errored."""
    return web.Response(status=503, text="down")


async def test_outcomes_a_killed_worker_had_reported_are_counted_once(worlds: Worlds) -> None:
    """The worker reports outcomes with the jobs they belong to, and the proxy writes them: a
    worker killed after its report and before any flush of its own loses nothing, errored
    comparisons (the gate's evidence in Postgres) included, and counts nothing twice."""
    async with worlds(
        hooks=Hooks(target=down),
    ) as world:
        link = link_of(world)
        for attempt in range(3):
            await reads(world, range(1, 4), concurrency=1)
            deadline = time.monotonic() + 30  # reported (every 0.1 s; longer on a busy machine)
            while link.unreported and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert link.unreported == 0
            first = link.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            while link.pid in (None, first):
                await asyncio.sleep(0.05)
            counts = await world.settled()
            assert counts["errored"] == 3 * (attempt + 1), counts
            assert counts["dropped"] == 0, counts
            errored = await world.replica.pool.fetchval(
                "SELECT sum(n) FROM bascule_shadow_error WHERE dataset = 'dcir'"
            )
            assert errored == 3 * (attempt + 1)


@pytest.mark.parametrize("mode", ["inline", "process"])
async def test_a_read_counted_before_its_noise_pair_is_not_dropped_at_stop(
    worlds: Worlds, ledger_counts: Counts, mode: str
) -> None:
    """In `live` the slow target serves; the source's shadow read is compared at once, then
    the noise pair asks the target again (2 s): stopping then cancels the pair, not the read."""
    async with worlds(
        extra="[defaults]\nnoise_sample = 1.0\n",
        hooks=Hooks(target=late()),
        stages=LIVE,
        shadow_worker=mode,
    ) as world:
        await reads(world, range(3, 4), concurrency=1)
        await asyncio.sleep(1.0)
    counts = await ledger_counts(world.started)
    assert (counts["matched"], counts["compared"], counts["dropped"]) == (1, 1, 0), counts


@pytest.mark.parametrize("pause", [0.1, 0.8])
async def test_stopping_while_a_worker_restarts_is_prompt(
    worlds: Worlds,
    pause: float,
) -> None:
    """0.1 s: in the back-off before a restart; 0.8 s: the new worker starting."""
    async with worlds() as world:
        link = link_of(world)
        assert link.pid is not None
        os.kill(link.pid, signal.SIGKILL)
        await asyncio.sleep(pause)
        started = time.monotonic()
        await link.stop()
        assert time.monotonic() - started < 3
        # Nothing runs after it, and nothing submitted after it fails the researcher.
        assert link.room() == 0
        await reads(world, range(1, 4))
        await link.join()


async def test_a_wedged_worker_is_replaced(
    worlds: Worlds,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that stops answering (here SIGSTOP) is killed once it has been silent for
    SILENT_WAIT, what it held is counted dropped, and another takes over; researchers are
    served all along."""
    monkeypatch.setattr(link_module, "SILENT_WAIT", 2.0)
    async with worlds() as world:
        link = link_of(world)
        first = link.pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)
        await reads(world, range(1, 6))  # held by the stopped worker
        deadline = time.monotonic() + 20
        while link.pid in (None, first):
            assert time.monotonic() < deadline, "the wedged worker was never replaced"
            await asyncio.sleep(0.1)
        await reads(world, range(6, 9))
        counts = await world.settled()
    assert counts["dropped"] == 5 and counts["matched"] == 3, counts
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)


@pytest.mark.parametrize("mode", ["inline", "process"])
async def test_a_read_after_shadow_reads_stopped_is_served_and_dropped(
    worlds: Worlds,
    mode: str,
) -> None:
    """A researcher's read still in flight when its replica stops shadow reads (past the
    server's grace) is served; its shadow read is counted dropped, and join does not hang."""
    async with worlds(shadow_worker=mode) as world:
        shadow = world.replica.shadow
        assert shadow is not None
        await shadow.stop()
        await reads(world, range(1, 3))
        async with asyncio.timeout(10):
            counts = await world.settled()
    assert counts["dropped"] == 2 and counts["compared"] == 0, counts
