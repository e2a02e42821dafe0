"""The controller with real processes: two proxies under researchers' reads; exactly one
controller acts; it promotes dcir once its gate holds, rolls it back on a divergence in `live`
and turns auto_promote off; killed, the other proxy's controller takes over."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import aiohttp
import orjson
import pytest

from bascule.stages import Stage
from refapi.lab import AUTH
from tests.conftest import Ground
from tests.world import RULES, World, build_world

pytestmark = [pytest.mark.timeout(180), pytest.mark.xdist_group("fleet")]

WINDOW = 4.0
GATE = f"""
[datasets.dcir.gate]
min_compared = 20
window = {WINDOW}
verification = true
"""


def ok(world: World, *args: str) -> str:
    """An SRE's command, done."""
    done = world.cli(*args, "--by", "sre")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def look(world: World, *args: str) -> str:
    """An SRE's look (no change, no --by)."""
    done = world.cli(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def stage_of(world: World) -> Stage:
    rows = await world.sql(world.state_db, "SELECT stage FROM bascule_stage WHERE dataset='dcir'")
    return Stage(rows[0]["stage"])


async def until(world: World, stage: Stage, within: float) -> float:
    """Seconds until dcir is at ``stage``; fails past ``within``, saying what the gate says."""
    started = time.monotonic()
    while await stage_of(world) is not stage:
        if time.monotonic() - started > within:
            gate = world.cli("gate", "dcir")
            raise AssertionError(f"dcir not at {stage} in {within} s:\n{gate.stdout}")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def holder(world: World) -> str | None:
    rows = await world.sql(
        world.state_db,
        "SELECT holder FROM bascule_lease WHERE name = 'controller' AND expires_at > now()",
    )
    return rows[0]["holder"] if rows else None


@asynccontextmanager
async def researchers(proxies: Sequence[str]) -> AsyncIterator[None]:
    """Researchers reading dcir's records through every proxy, steadily."""
    stop = asyncio.Event()

    async def read(base: str) -> None:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            rid = 0
            while not stop.is_set():
                rid = rid % 20 + 1
                # A proxy killed by the test refuses connections: its researchers give up.
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"{base}/v1/datasets/dcir/records/{rid}") as resp:
                        await resp.read()
                await asyncio.sleep(0.02)

    readers = asyncio.gather(*(read(p) for p in proxies))
    try:
        yield
    finally:
        stop.set()
        await readers


async def test_one_controller_promotes_rolls_back_and_another_takes_over(ground: Ground) -> None:
    async with build_world(
        ground,
        replicas=2,
        processes=True,
        ids=True,
        rules=RULES,
        extra=GATE,
        open_gate=False,
        controller_interval=0.5,
    ) as world:
        # As an SRE would: dual write, a verification (the databases were seeded alike: it
        # closes the target's gap), shadow, then auto_promote on.
        ok(world, "stage", "dcir", "dualwrite", "--reason", "start")
        verified = world.cli("verify", "dcir", "--by", "sre")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        ok(world, "stage", "dcir", "shadow", "--reason", "verified")
        acting = await holder(world)
        assert acting is not None  # one of the two holds the controller's lease
        async with researchers(world.proxies):
            ok(world, "auto-promote", "dcir", "on", "--reason", "let the controller go")
            took = await until(world, Stage.LIVE, WINDOW + 20)
            assert took <= WINDOW + 8, took  # the window, plus a few rounds and a flip
            history = orjson.loads(look(world, "history", "dcir", "--json"))["history"]
            promoted = history[-1]
            assert (promoted["actor"], promoted["to_stage"]) == ("controller", "live")
            assert promoted["details"]["replica"] == acting  # the lease holder acted, alone
            assert promoted["details"]["gate"]["volume"] >= 20
            assert promoted["details"]["gate"]["mismatches"] == 0

            # In live the source is shadow-read: a divergence there rolls dcir back.
            await world.sql(world.source_db, "UPDATE dcir SET amount = amount + 7 WHERE id = 3")
            await until(world, Stage.SHADOW, 20)
            history = orjson.loads(look(world, "history", "dcir", "--json"))["history"]
            off, back = history[-2], history[-1]
            assert (off["action"], off["actor"]) == ("auto-promote", "controller")
            assert (back["action"], back["to_stage"], back["actor"]) == (
                "rollback",
                "shadow",
                "controller",
            )
            assert back["details"]["live_mismatch_budget"]["mismatches"] >= 1
            status = orjson.loads(look(world, "status", "dcir", "--json"))
            assert status["datasets"][0]["auto_promote"] is False
            # Text output names both moves too.
            table = look(world, "history", "dcir")
            assert table.count("controller") >= 3

            # The acting controller dies: the other proxy's takes its lease over and acts.
            await world.sql(world.source_db, "UPDATE dcir SET amount = amount - 7 WHERE id = 3")
            names = await world.sql(world.state_db, "SELECT name FROM bascule_replica")
            victim = next(
                i
                for i, proc in enumerate(world.procs)
                if proc.proc is not None and acting.endswith(f":{proc.proc.pid}")
            )
            assert len(names) == 2
            world.procs[victim].signal(signal.SIGKILL)
            survivor = world.procs[1 - victim]
            for _ in range(100):
                now = await holder(world)
                if now is not None and now != acting:
                    break
                await asyncio.sleep(0.1)
            assert now is not None and survivor.proc is not None
            assert now.endswith(f":{survivor.proc.pid}")
        # Fresh evidence under a new shadow version, read through the survivor only.
        ok(world, "rollback", "dcir", "--to", "dualwrite", "--reason", "rerun")
        ok(world, "stage", "dcir", "shadow", "--reason", "repaired")
        async with researchers([world.proxies[1 - victim]]):
            ok(world, "auto-promote", "dcir", "on", "--reason", "again")
            await until(world, Stage.LIVE, WINDOW + 20)
        history = orjson.loads(look(world, "history", "dcir", "--json"))["history"]
        assert history[-1]["actor"] == "controller"
        assert history[-1]["details"]["replica"] == now
