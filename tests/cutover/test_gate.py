"""The gate, through the real command: each condition failing alone refuses ``shadow -> live``
with its own reason and figure; all holding, the flip passes; a forced flip is audited with the
failing figures; the dry run and the admin API give the same answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from bascule.app.admin import AdminDeps, create_admin_app
from bascule.app.operations import Operations
from bascule.stages import Stage
from bascule.state.fleet import RedisAnnouncer
from cutover.gate import gates_of
from refapi.lab import OPERATOR_TOKEN, VIEWER_TOKEN
from tests.cutover.conftest import OTHER_ROUTE, ROUTE, Gated
from tests.cutover.test_admin_and_cli import OP, arun, call
from tests.harness import serve_app


async def gate_of(world: Gated) -> dict[str, Any]:
    done = await arun(world.env, "gate", "dcir", "--json")
    report: dict[str, Any] = orjson.loads(done.stdout)
    assert done.returncode == (0 if report["ok"] else 3), done.stderr
    return report


async def test_with_every_condition_holding_the_flip_passes(gated: Gated) -> None:
    report = await gate_of(gated)
    assert report["ok"] is True and report["move"] == "shadow -> live"
    names = [c["condition"] for c in report["conditions"]]
    assert names == [
        "window",
        "volume",
        "routes",
        "mismatches",
        "errored",
        "backlog",
        "journal",
        "gap",
        "verified",
    ]
    # status and divergence show the ledger's counts under the current stage version.
    status = orjson.loads((await arun(gated.env, "status", "dcir", "--json")).stdout)
    assert status["datasets"][0]["shadow"]["compared"] == 10
    assert "10 compared, 0 mismatched" in (await arun(gated.env, "status")).stdout
    found = orjson.loads((await arun(gated.env, "divergence", "dcir", "--json")).stdout)
    assert (found["version"], found["counts"]["matched"]) == (await gated.version(), 10)
    done = await arun(gated.env, "stage", "dcir", "live", "--reason", "gate holds")
    assert done.returncode == 0, done.stderr
    # Under the new stage version the figures start afresh.
    status = orjson.loads((await arun(gated.env, "status", "dcir", "--json")).stdout)
    assert status["datasets"][0]["shadow"]["compared"] == 0
    last = (await gated.store.history("dcir"))[-1]
    assert (last.to_stage, last.forced) == ("live", False)
    assert last.details["gate"]["volume"] == 10  # audited with the figures it passed on


Breaker = Callable[[Gated], Awaitable[None]]


async def _recent(world: Gated) -> None:
    await world.sql("UPDATE bascule_stage SET updated_at = now() - interval '5 seconds'")


async def _few(world: Gated) -> None:
    await world.counted(ROUTE, "compared", 3)


async def _silent_route(world: Gated) -> None:
    await world.counted(OTHER_ROUTE, "dropped", 4)


async def _mismatch(world: Gated) -> None:
    await world.mismatch()


async def _errored(world: Gated) -> None:
    minute = await world.pool.fetchval("SELECT date_trunc('minute', now())")
    await world.evidence("bascule_shadow_error", reason="shadow_timeout", minute=minute, n=2)


async def _waiting(world: Gated) -> None:
    await world.entry("pending", age=30.0)


async def _dead(world: Gated) -> None:
    await world.entry("dead", age=1.0)


async def _gap(world: Gated) -> None:
    # The target's gap open again (as a skip or a rollback through `source` would), kept apart
    # from the verification's time so that only this condition fails.
    await world.sql("UPDATE bascule_stage SET gap_target_since = now() - interval '3 minutes'")


async def _unverified(world: Gated) -> None:
    await world.sql("DELETE FROM bascule_verify_run")


@pytest.mark.parametrize(
    ("condition", "breaker", "figure", "reason"),
    [
        ("window", _recent, None, "s of the 60 s window"),
        ("volume", _few, 3, "3 comparisons of the target in the window, 5 needed"),
        ("routes", _silent_route, [OTHER_ROUTE], "read routes seen with no comparison"),
        ("mismatches", _mismatch, 1, "1 mismatches in the window"),
        ("errored", _errored, 2, "2 comparisons could not be made"),
        ("backlog", _waiting, 1, "1 journaled writes waiting longer than 5 s"),
        ("journal", _dead, {"in_doubt": 0, "dead": 1, "orphans": 0}, "1 dead"),
        ("gap", _gap, "*", "has had an open gap since"),
        ("verified", _unverified, None, "no clean verification yet"),
    ],
)
async def test_each_condition_failing_alone_refuses_the_flip_with_its_figure(
    gated: Gated, condition: str, breaker: Breaker, figure: Any, reason: str
) -> None:
    await breaker(gated)
    report = await gate_of(gated)
    failing = {c["condition"]: c for c in report["conditions"] if not c["ok"]}
    assert list(failing) == [condition], failing
    if figure == "*":
        assert failing[condition]["figure"] is not None
    elif condition != "window":
        assert failing[condition]["figure"] == figure
    assert reason in failing[condition]["detail"]
    before = (await gated.store.all(), await gated.store.history())
    done = await arun(gated.env, "stage", "dcir", "live", "--reason", "try")
    assert done.returncode == 3, done.stdout
    if condition == "gap":  # the gap rule refuses first, naming the gap as the gate does
        assert "the target has had an open gap since" in done.stderr
    else:
        assert f"the gate refuses shadow -> live: {condition}: " in done.stderr
        assert reason in done.stderr
    dry = await arun(gated.env, "stage", "dcir", "live", "--dry-run", "--json")
    assert dry.returncode == 3
    found = orjson.loads(dry.stdout)
    assert found["allowed"] is False
    assert [c["condition"] for c in found["gate"]["conditions"] if not c["ok"]] == [condition]
    assert (await gated.store.all(), await gated.store.history()) == before  # nothing changed


async def test_a_forced_flip_is_audited_with_the_failing_figures(gated: Gated) -> None:
    await _few(gated)
    await _mismatch(gated)
    done = await arun(
        gated.env, "stage", "dcir", "live", "--force", "--reason", "CHG-42", "--by", "alice"
    )
    assert done.returncode == 0, done.stderr
    assert (await gated.store.get("dcir")).stage is Stage.LIVE
    last = (await gated.store.history("dcir"))[-1]
    assert (last.actor, last.forced, last.reason) == ("alice", True, "CHG-42")
    assert last.details["forced_gate"] == ["volume", "mismatches"]
    assert (last.details["gate"]["volume"], last.details["gate"]["mismatches"]) == (3, 1)


async def test_rollbacks_are_never_gated(gated: Gated) -> None:
    await _mismatch(gated)
    await _unverified(gated)
    done = await arun(gated.env, "rollback", "dcir", "--reason", "back")
    assert done.returncode == 0, done.stderr
    assert (await gated.store.get("dcir")).stage is Stage.DUALWRITE


async def test_the_admin_api_gives_the_same_answer(
    gated: Gated, redis_url: str, redis_prefix: str
) -> None:
    await _few(gated)
    redis = aioredis.Redis.from_url(redis_url)
    from bascule.config import load_config

    config = load_config(gated.config)
    ops = Operations(
        gated.store,
        RedisAnnouncer(redis, redis_prefix),
        gate=gates_of(config, gated.pool),
    )
    deps = AdminDeps(ops, None, {"operator": OPERATOR_TOKEN}, VIEWER_TOKEN)
    try:
        async with serve_app(create_admin_app(deps)) as url:
            view = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
            status, report = await call("GET", url + "/v1/datasets/dcir/gate", view)
            assert (status, report["ok"]) == (200, False)
            status, body = await call(
                "POST", url + "/v1/datasets/dcir/stage", OP, {"stage": "live", "reason": "go"}
            )
            assert (
                status == 409
                and "the gate refuses shadow -> live: volume" in (body["error"]["message"])
            )
            status, body = await call(
                "POST",
                url + "/v1/datasets/dcir/stage",
                OP,
                {"stage": "live", "dry_run": True},
            )
            assert status == 409 and body["dry_run"]["gate"]["ok"] is False
    finally:
        await redis.aclose()
    assert (await gated.store.get("dcir")).stage is Stage.SHADOW


async def test_a_skipped_write_opens_the_gap_the_gate_and_the_dry_run_then_refuse(
    gated: Gated,
) -> None:
    """`journal skip` gives up a write the target never got: the target's gap opens (audited),
    `status` shows it, and the dry run and the gate refuse what the gap forbids."""
    await gated.entry("dead", age=1.0)
    seq = await gated.pool.fetchval("SELECT max(seq) FROM bascule_journal")
    assert (await gate_of(gated))["ok"] is False  # the dead entry itself
    done = await arun(gated.env, "journal", "skip", str(seq), "--reason", "gave up")
    assert done.returncode == 0, done.stderr
    status = orjson.loads((await arun(gated.env, "status", "dcir", "--json")).stdout)
    assert status["datasets"][0]["gaps"]["target"] is not None
    last = (await gated.store.history("dcir"))[-1]
    assert last.details["gap"] == "target" and last.details["gap_opened"] is True
    report = await gate_of(gated)
    failing = [c["condition"] for c in report["conditions"] if not c["ok"]]
    assert failing == ["gap", "verified"]  # the verification is older than the new gap
    dry = await arun(gated.env, "stage", "dcir", "live", "--dry-run")
    assert dry.returncode == 3 and "the target has had an open gap since" in dry.stderr
