"""Gap markers: a side that missed writes may not serve, be authoritative or be compared in
`shadow` until its gap is closed (or an audited --force); and dry runs, which change nothing.

The rule is tested as a pure function against tables written out again here; the surfaces (the
controller, the CLI, the admin API) against the stage table, the audit and Redis, before and
after.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from bascule.errors import IllegalMove, Refused, UsageError
from bascule.stages import (
    EXPOSED,
    ORDER,
    GapOpen,
    Side,
    Stage,
    alters_writes,
    blocking_gaps,
    check_gap_close,
    opens_gaps,
    role,
    switches_authority,
)
from bascule.state.fleet import channel
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageRow, StageStore
from cutover import controller
from cutover.switch import planned_steps
from refapi.lab import OPERATOR_TOKEN, migrate_state, walk
from tests.cutover.test_admin_and_cli import OP, VIEW, Admin, admin, arun, call
from tests.harness import cli_env as harness_cli_env

__all__ = ["admin"]  # the admin API fixture, shared

SRC, DW, SH, LIVE, RD, TGT = ORDER
S, T = Side.SOURCE, Side.TARGET
SINCE = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


# --- the pure rule -----------------------------------------------------------------------------

# Written out again from the stage table of docs/architecture.md: in which stages each side, if it
# has an open gap, blocks the move. The target: serving, authoritative, or compared in `shadow`. The
# source: serving or authoritative (its shadow-read in `live` does not count).
BLOCKS = {
    #          source  dualwrite shadow  live   rampdown target
    Side.SOURCE: (True, True, True, False, False, False),
    Side.TARGET: (False, False, True, True, True, True),
}


@pytest.mark.parametrize(("side", "stage"), list(itertools.product(Side, ORDER)))
def test_which_stages_a_gap_blocks(side: Side, stage: Stage) -> None:
    blocks = BLOCKS[side][stage.position]
    assert (stage in EXPOSED[side]) is blocks
    assert blocking_gaps(stage, {side: SINCE}) == ({side: SINCE} if blocks else {})
    assert blocking_gaps(stage, {}) == {}


@pytest.mark.parametrize("stage", ORDER)
def test_both_gaps_block_wherever_either_does(stage: Stage) -> None:
    later = SINCE + timedelta(days=1)
    found = blocking_gaps(stage, {S: SINCE, T: later})
    expected = {side: t for side, t in ((S, SINCE), (T, later)) if BLOCKS[side][stage.position]}
    assert found == expected
    assert found  # every stage exposes one side or the other


def test_the_rollback_from_target_is_refused_only_where_the_source_becomes_authoritative() -> None:
    gaps = {S: SINCE}  # opened on entering `target`
    path = [(TGT, RD), (RD, LIVE), (LIVE, SH), (SH, DW), (LIVE, SRC)]
    assert [bool(blocking_gaps(to, gaps)) for _, to in path] == [False, False, True, True, True]


# Which moves alter writes, derived independently: the boundaries where the authority or the
# sides written change lie between source|dualwrite, shadow|live and rampdown|target.
WRITE_BOUNDARIES = {1, 3, 5}  # a boundary k lies between ORDER[k-1] and ORDER[k]
AUTHORITY_BOUNDARY = 3


@pytest.mark.parametrize(("a", "b"), list(itertools.product(ORDER, ORDER)))
def test_alters_writes_and_switches_authority(a: Stage, b: Stage) -> None:
    low, high = sorted((a.position, b.position))
    crossed = set(range(low + 1, high + 1))
    assert alters_writes(a, b) is bool(crossed & WRITE_BOUNDARIES)
    assert switches_authority(a, b) is (AUTHORITY_BOUNDARY in crossed)


@pytest.mark.parametrize(
    ("a", "b", "alters"),
    [
        (SRC, DW, True),
        (DW, SH, False),
        (SH, LIVE, True),
        (LIVE, RD, False),
        (RD, TGT, True),
        (TGT, RD, True),
        (LIVE, SH, True),
        (DW, SRC, True),
        (RD, LIVE, False),
        (LIVE, DW, True),
    ],
)
def test_the_moves_named_in_the_design(a: Stage, b: Stage, alters: bool) -> None:
    assert alters_writes(a, b) is alters


@pytest.mark.parametrize(("a", "b"), list(itertools.product(ORDER, ORDER)))
def test_gaps_open_on_entering_target_or_source(a: Stage, b: Stage) -> None:
    expected = {TGT: {S}, SRC: {T}}.get(b, set()) if a != b else set()
    assert opens_gaps(a, b) == expected


@pytest.mark.parametrize(
    ("side", "stage", "words"),
    [
        (S, SH, "serve reads and be authoritative for writes"),
        (T, SH, "be shadow-read and compared"),
        (S, LIVE, "be shadow-read and compared"),
        (T, LIVE, "serve reads and be authoritative for writes"),
        (S, RD, "only receive replayed writes"),
        (T, DW, "only receive replayed writes"),
        (S, TGT, "receive nothing"),
    ],
)
def test_roles_in_words(side: Side, stage: Stage, words: str) -> None:
    assert role(side, stage) == words


@pytest.mark.parametrize(("side", "stage"), list(itertools.product(Side, ORDER)))
def test_a_gap_closes_only_if_open_and_while_the_side_is_written(side: Side, stage: Stage) -> None:
    with pytest.raises(Refused, match=f"the {side.value} has no open gap"):
        check_gap_close("dcir", side, stage, None)
    not_written = (side, stage) in {(S, TGT), (T, SRC)}
    if not_written:
        with pytest.raises(Refused, match=f"writes do not reach the {side.value} in {stage}"):
            check_gap_close("dcir", side, stage, SINCE)
    else:
        check_gap_close("dcir", side, stage, SINCE)


def test_the_refusal_names_dataset_side_since_and_what_to_do() -> None:
    message = str(GapOpen("dcir", LIVE, SH, {S: SINCE}))
    assert message.startswith("dcir: cannot move live -> shadow: the source has had an open gap")
    assert "since 2024-05-01 12:00:00Z" in message
    assert "in shadow it would serve reads and be authoritative for writes" in message
    assert "`bascule gap close dcir source --reason TEXT`" in message
    assert "`--force --reason TEXT`" in message
    assert Side.parse("target") is T
    with pytest.raises(UsageError, match="unknown side 'both'"):
        Side.parse("both")


def _row(
    stage: Stage, *, source: datetime | None = None, target: datetime | None = None
) -> StageRow:
    return StageRow("dcir", stage, 7, SINCE, "t", "t", 3, source, target)


def test_assess_refuses_an_illegal_move_before_the_gap_and_checks_both() -> None:
    found = controller.assess(_row(DW, target=SINCE), LIVE, force=False)
    assert isinstance(found.refusal, IllegalMove)
    assert [(c.name, c.ok) for c in found.checks] == [("legal move", False), ("gaps", False)]
    assert found.steps == ()
    found = controller.assess(_row(DW, target=SINCE), SH, force=False)
    assert isinstance(found.refusal, GapOpen) and found.forced_gaps == {}
    found = controller.assess(_row(DW, target=SINCE), SH, force=True)
    assert found.refusal is None and found.forced_gaps == {T: SINCE}
    assert "overridden by force" in found.checks[1].detail
    found = controller.assess(_row(TGT, source=SINCE), RD, force=False)
    assert found.refusal is None and found.forced_gaps == {}
    assert "does not block rampdown: there it would only receive replayed writes" in (
        found.checks[1].detail
    )


def steps_of(row: StageRow, wanted: Stage) -> tuple[str, ...]:
    return tuple(step.text for step in planned_steps(row, wanted))


def test_the_steps_of_a_move_depend_on_what_it_changes() -> None:
    fence = "write fence exclusively"
    switch = steps_of(_row(SH), LIVE)
    text = " | ".join(switch)
    for needle in (
        "wait until the backlog of dcir's writes toward the target is small",
        fence,
        "drain the backlog toward the target to zero",
        "advance the target's id sequence past every id the source holds",
        "version 7 -> 8",
        "bump the write epoch (3 -> 4)",
        "every live replica has confirmed version 8",
    ):
        assert needle in text, needle
    # The order of the barrier (docs/architecture.md, *A flip*): wait for a small backlog, hold
    # writes, drain, commit.
    assert text.index("is small") < text.index(fence) < text.index("drain") < text.index("bump")
    back = " | ".join(steps_of(_row(LIVE), SH))
    assert "toward the source is small" in back and "the source's id sequence" in back
    last = " | ".join(steps_of(_row(RD), TGT))
    assert fence in last and "bump the write epoch" in last and "open the source's gap" in last
    assert "drain" not in last
    quiet = " | ".join(steps_of(_row(DW), SH))
    assert fence not in quiet and "write epoch" not in quiet and "writes are unaffected" in quiet
    # A gap already open is not opened again.
    again = " | ".join(steps_of(_row(DW, target=SINCE), SRC))
    assert "gap marker" not in again


# --- the store: write epoch and gap markers, in the same UPDATE as the stage ------------------


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[StageStore]:
    await migrate_state(pg_url)
    pool = await open_pool(pg_url)
    yield StageStore(pool)
    await pool.close()


async def _to(store: StageStore, dataset: str, *stages: Stage) -> StageRow:
    """Through the store directly: the mechanism, whatever the gaps (test set-up)."""
    return await walk(store, dataset, *stages, actor="setup")


async def test_changes_bump_the_write_epoch_and_open_gaps(store: StageStore) -> None:
    fresh = await store.get("dcir")
    assert fresh.write_epoch == 1 and set(fresh.gaps) == {T} and fresh.gap_source_since is None
    epochs = []
    for stage in (DW, SH, LIVE, RD, TGT):
        epochs.append((await _to(store, "dcir", stage)).write_epoch)
    assert epochs == [2, 2, 3, 3, 4]
    at_target = await store.get("dcir")
    assert set(at_target.gaps) == {S, T}  # the source's opened on entering `target`
    audit = await store.history("dcir")
    assert audit[-1].details == {"write_epoch": 4, "gaps_opened": ["source"]}
    assert audit[-2].details == {}  # live -> rampdown alters nothing
    # Entering `source` opens the target's gap, keeping the older `since` of one already open.
    assert at_target.gap_target_since == fresh.gap_target_since
    back = await _to(store, "dcir", SRC)
    assert back.gap_target_since == fresh.gap_target_since and back.write_epoch == 5
    assert back.as_json()["gaps"] == {
        "source": at_target.gaps[S].isoformat(),
        "target": fresh.gaps[T].isoformat(),
    }


async def test_a_closed_gap_reopens_on_the_next_rollback_to_source(store: StageStore) -> None:
    await _to(store, "dcir", DW)
    closed = await controller.close_gap(store, "dcir", T, actor="alice", reason="verified")
    assert closed.row.gaps == {} and closed.row.version == 2  # the stage's version is unchanged
    last = (await store.history("dcir"))[-1]
    assert (last.action, last.actor, last.forced, last.from_stage, last.to_stage) == (
        "gap-close",
        "alice",
        False,
        None,
        None,
    )
    assert last.details == {
        "side": "target",
        "since": closed.since.isoformat(),
        "stage": "dualwrite",
        "version": 2,
    }
    reopened = await _to(store, "dcir", SRC)
    assert reopened.gap_target_since is not None and reopened.gap_target_since > closed.since


# --- the controller: refusals change nothing, force is audited --------------------------------


class Recorder:
    def __init__(self) -> None:
        self.rows: list[StageRow] = []

    async def announce(self, row: StageRow) -> bool:
        self.rows.append(row)
        return True


async def test_controller_refuses_forces_and_dry_runs(store: StageStore) -> None:
    rec = Recorder()
    await _to(store, "dcir", DW)
    before = (await store.all(), await store.history())
    with pytest.raises(GapOpen, match="the target has had an open gap since"):
        await controller.move(store, rec, "dcir", SH, actor="a", reason="go")
    dry = await controller.move(store, rec, "dcir", SH, actor="a", reason=None, dry_run=True)
    assert (dry.dry_run, dry.allowed, dry.after) == (True, False, None)
    assert dry.refusal is not None and "bascule gap close dcir target" in dry.refusal
    with pytest.raises(Refused, match="the source has no open gap"):
        await controller.close_gap(store, "dcir", S, actor="a", reason="x")
    with pytest.raises(UsageError, match="a reason is required"):
        await controller.close_gap(store, "dcir", T, actor="a", reason=" ")
    assert (await store.all(), await store.history()) == before
    assert rec.rows == []
    forced = await controller.move(store, rec, "dcir", SH, actor="a", reason="ok", force=True)
    assert forced.after is not None and forced.after.stage is SH
    assert set(forced.after.gaps) == {T}  # forcing is not verifying: the gap stays open
    last = (await store.history("dcir"))[-1]
    gap_since = before[0]["dcir"].gap_target_since
    assert gap_since is not None
    assert (last.forced, last.details) == (True, {"forced_gaps": {"target": gap_since.isoformat()}})
    # --force with nothing to override is not recorded as forced.
    plain = await controller.move(store, rec, "pmsi", DW, actor="a", reason="r", force=True)
    assert plain.forced_gaps == {} and (await store.history("pmsi"))[-1].forced is False


# --- the CLI -----------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    return harness_cli_env(tmp_path, pg_url, redis_url, redis_prefix)


@asynccontextmanager
async def announcements(redis_url: str, prefix: str) -> AsyncIterator[aioredis.client.PubSub]:
    """Listen on the channel stage changes are announced on."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(channel(prefix))
            assert (await pubsub.get_message(timeout=2.0) or {}).get("type") == "subscribe"
            yield pubsub
    finally:
        await client.aclose()


async def heard(pubsub: aioredis.client.PubSub) -> list[dict[str, Any]]:
    got = []
    while (message := await pubsub.get_message(timeout=0.5)) is not None:
        got.append(orjson.loads(message["data"]))
    return got


async def snapshot(store: StageStore) -> tuple[object, object]:
    return await store.all(), await store.history()


async def test_cli_refusal_force_gap_close_and_status(
    store: StageStore, env: dict[str, str]
) -> None:
    await _to(store, "dcir", DW)
    await _to(store, "pmsi", DW)
    since = (await store.get("dcir")).gap_target_since
    assert since is not None
    before = await snapshot(store)
    done = await arun(env, "stage", "dcir", "shadow", "--reason", "go", "--by", "bob")
    assert done.returncode == 3, done.stderr
    assert f"the target has had an open gap since {since:%Y-%m-%d %H:%M:%S}Z" in done.stderr
    assert "`bascule gap close dcir target --reason TEXT`" in done.stderr
    assert "`--force --reason TEXT`" in done.stderr
    done = await arun(env, "gap", "close", "dcir", "source", "--reason", "x")
    assert done.returncode == 3 and "dcir: the source has no open gap" in done.stderr
    done = await arun(env, "gap", "close", "dcir", "target")
    assert done.returncode == 2 and "a reason is required" in done.stderr
    assert await snapshot(store) == before

    done = await arun(env, "stage", "dcir", "shadow", "--force", "--reason", "CHG-9", "--by", "bob")
    assert done.returncode == 0, done.stderr
    assert "forced over the target's gap" in done.stdout
    last = (await store.history("dcir"))[-1]
    assert (last.actor, last.to_stage, last.forced, last.details["forced_gaps"]) == (
        "bob",
        "shadow",
        True,
        {"target": since.isoformat()},
    )

    done = await arun(env, "gap", "close", "pmsi", "target", "--reason", "verified", "--by", "eve")
    assert done.returncode == 0, done.stderr
    assert "pmsi: the target's gap (open since" in done.stdout
    last = (await store.history("pmsi"))[-1]
    assert (last.action, last.actor, last.reason, last.details["side"]) == (
        "gap-close",
        "eve",
        "verified",
        "target",
    )
    assert (await store.get("pmsi")).gaps == {}

    status = orjson.loads((await arun(env, "status", "--json")).stdout)
    gaps = {d["dataset"]: d["gaps"] for d in status["datasets"]}
    assert gaps["pmsi"] == {"source": None, "target": None}
    assert gaps["dcir"] == {"source": None, "target": since.isoformat()}
    table = (await arun(env, "status")).stdout
    assert "gaps" in table and f"target since {since:%Y-%m-%d %H:%M:%S}Z" in table
    history = (await arun(env, "history", "dcir")).stdout
    assert "stage (forced)" in history


async def test_cli_rollback_from_target_refused_where_the_source_becomes_authoritative(
    store: StageStore, env: dict[str, str]
) -> None:
    """Acceptance: target -> rampdown -> live -> shadow after writes in `target`: refused at
    live -> shadow while the source's gap is open; allowed after `gap close`."""
    await _to(store, "dcir", DW)
    await controller.close_gap(store, "dcir", T, actor="setup", reason="setup")
    await _to(store, "dcir", SH, LIVE, RD, TGT)
    source_since = (await store.get("dcir")).gap_source_since
    assert source_since is not None
    for expected in ("rampdown", "live"):
        done = await arun(env, "rollback", "dcir", "--reason", "back", "--by", "sre")
        assert done.returncode == 0, done.stderr
        assert f"-> {expected}" in done.stdout
    before = await snapshot(store)
    done = await arun(env, "rollback", "dcir", "--reason", "back", "--by", "sre")
    assert done.returncode == 3, done.stdout
    assert "dcir: cannot move live -> shadow: the source has had an open gap since" in done.stderr
    assert "in shadow it would serve reads and be authoritative for writes" in done.stderr
    assert "`bascule gap close dcir source --reason TEXT`" in done.stderr
    assert await snapshot(store) == before
    done = await arun(env, "gap", "close", "dcir", "source", "--reason", "verified", "--by", "sre")
    assert done.returncode == 0, done.stderr
    done = await arun(env, "rollback", "dcir", "--reason", "back", "--by", "sre")
    assert done.returncode == 0, done.stderr
    row = await store.get("dcir")
    assert (row.stage, row.gaps) == (SH, {})
    actions = [(h.action, h.to_stage) for h in (await store.history("dcir"))[-6:]]
    assert actions == [
        ("stage", "target"),
        ("rollback", "rampdown"),
        ("rollback", "live"),
        ("gap-close", None),
        ("auto-promote", None),  # authority back to the source: the controller must not undo it
        ("rollback", "shadow"),
    ]


async def test_cli_dry_run_changes_nothing_allowed_or_refused(
    store: StageStore, env: dict[str, str], redis_url: str, redis_prefix: str
) -> None:
    await _to(store, "pmsi", DW)  # its target's gap is open: shadow would be refused
    async with announcements(redis_url, redis_prefix) as pubsub:
        before = await snapshot(store)
        allowed = await arun(env, "stage", "dcir", "dualwrite", "--dry-run")
        assert allowed.returncode == 0, allowed.stderr
        out = allowed.stdout
        assert "dcir: dry run of source -> dualwrite" in out and "nothing changed" in out
        assert "ok       legal move" in out and "ok       gaps" in out
        assert "take dcir's write fence exclusively" in out
        assert "bump the write epoch (1 -> 2)" in out
        assert "every live replica has confirmed version 2" in out
        assert "it would be allowed" in out
        refused = await arun(env, "stage", "pmsi", "shadow", "--dry-run", "--reason", "try")
        assert refused.returncode == 3
        assert "REFUSED  gaps: the target has had an open gap" in refused.stdout
        assert "bascule: refused: pmsi: cannot move dualwrite -> shadow" in refused.stderr
        as_json = await arun(env, "rollback", "pmsi", "--to", "source", "--dry-run", "--json")
        assert as_json.returncode == 0, as_json.stderr
        plan = orjson.loads(as_json.stdout)
        assert (plan["dry_run"], plan["allowed"], plan["from"], plan["to"]) == (
            True,
            True,
            "dualwrite",
            "source",
        )
        # The rules, then the switch's own checks, rehearsed (cutover/switch.py).
        assert [c["check"] for c in plan["checks"]] == ["legal move", "gaps", "switch"]
        assert await snapshot(store) == before
        assert await heard(pubsub) == []
        # The same listener hears a real move: the silence above means something.
        done = await arun(env, "stage", "dcir", "dualwrite", "--reason", "real")
        assert done.returncode == 0, done.stderr
        assert [m["dataset"] for m in await heard(pubsub)] == ["dcir"]


# --- the admin API -----------------------------------------------------------------------------


async def test_admin_refusal_force_and_dry_run(
    admin: Admin, redis_url: str, redis_prefix: str
) -> None:
    await _to(admin.store, "dcir", DW)
    path = admin.url + "/v1/datasets/dcir/stage"
    async with announcements(redis_url, redis_prefix) as pubsub:
        before = await admin.snapshot()
        status, body = await call("POST", path, OP, {"stage": "shadow", "reason": "go"})
        assert (status, body["error"]["code"]) == (409, "gap_open")
        assert "the target has had an open gap since" in body["error"]["message"]
        status, body = await call(
            "POST", path, OP, {"stage": "shadow", "reason": "go", "dry_run": True}
        )
        assert (status, body["error"]["code"]) == (409, "refused")
        assert body["dry_run"]["allowed"] is False and body["dry_run"]["dry_run"] is True
        assert body["dry_run"]["checks"][1]["ok"] is False
        status, body = await call(
            "POST",
            admin.url + "/v1/datasets/pmsi/stage",
            OP,
            {"stage": "dualwrite", "dry_run": True},
        )
        assert (status, body["allowed"], body["to"]) == (200, True, "dualwrite")
        assert any("write fence exclusively" in step for step in body["steps"])
        # A misspelt flag must not turn a dry run into a real move.
        status, body = await call(
            "POST", path, OP, {"stage": "shadow", "reason": "go", "dryrun": True, "force": True}
        )
        assert status == 400 and "unknown field(s) 'dryrun'" in body["error"]["message"]
        status, body = await call("POST", path, OP, {"stage": "shadow", "reason": "go", "force": 1})
        assert status == 400 and "'force' must be true or false" in body["error"]["message"]
        assert await admin.snapshot() == before
        assert await heard(pubsub) == []
        status, body = await call(
            "POST", path, OP, {"stage": "shadow", "reason": "CHG-9", "force": True, "by": "bob"}
        )
        assert (status, body["to"], body["forced"]) == (200, "shadow", True)
        assert [m["stage"] for m in await heard(pubsub)] == ["shadow"]
    last = (await admin.store.history("dcir"))[-1]
    assert last.forced is True and set(last.details["forced_gaps"]) == {"target"}
    assert (last.actor, last.details["on_behalf_of"]) == ("operator", "bob")


async def test_admin_gap_close_and_the_gaps_in_the_listing(admin: Admin) -> None:
    await _to(admin.store, "dcir", DW)
    since = (await admin.store.get("dcir")).gap_target_since
    assert since is not None
    url = admin.url + "/v1/datasets/dcir/gaps/target/close"
    before = await admin.snapshot()
    for headers, gap_url, body, code, needle in [
        (VIEW, url, {"reason": "r"}, 403, "operator token"),
        (OP, url, {}, 400, "a reason is required"),
        (OP, url, {"reason": "r", "side": "x"}, 400, "unknown field(s) 'side'"),
        (OP, admin.url + "/v1/datasets/dcir/gaps/both/close", {"reason": "r"}, 400, "side"),
        (OP, admin.url + "/v1/datasets/nope/gaps/target/close", {"reason": "r"}, 404, "nope"),
        (OP, admin.url + "/v1/datasets/dcir/gaps/source/close", {"reason": "r"}, 409, "no open"),
        (OP, admin.url + "/v1/datasets/pmsi/gaps/target/close", {"reason": "r"}, 409, "in source"),
    ]:
        status, answer = await call("POST", gap_url, headers, body)
        assert (status, needle in answer["error"]["message"]) == (code, True), answer
    assert await admin.snapshot() == before
    status, listing = await call("GET", admin.url + "/v1/datasets", VIEW)
    dcir = next(d for d in listing["datasets"] if d["dataset"] == "dcir")
    assert (dcir["gaps"], dcir["write_epoch"]) == ({"source": None, "target": since.isoformat()}, 2)
    status, answer = await call("POST", url, OP, {"reason": "verified", "by": "carol"})
    assert status == 200, answer
    assert (answer["side"], answer["since"], answer["gaps"]["target"]) == (
        "target",
        since.isoformat(),
        None,
    )
    last = (await admin.store.history("dcir"))[-1]
    assert (last.action, last.actor, last.details["on_behalf_of"], last.details["since"]) == (
        "gap-close",
        "operator",
        "carol",
        since.isoformat(),
    )
    status, answer = await call("POST", url, OP, {"reason": "again"})
    assert status == 409 and "dcir: the target has no open gap" in answer["error"]["message"]


async def test_cli_through_the_admin_api_dry_run_and_gap_close(admin: Admin) -> None:
    await _to(admin.store, "dcir", DW)
    env = {**os.environ, "BASCULE_ADMIN_URL": admin.url, "BASCULE_ADMIN_TOKEN": OPERATOR_TOKEN}
    before = await admin.snapshot()
    done = await arun(env, "stage", "dcir", "shadow", "--dry-run")
    assert done.returncode == 3
    assert "REFUSED  gaps" in done.stdout and "it would be refused" in done.stdout
    assert "bascule gap close dcir target" in done.stderr
    assert await admin.snapshot() == before
    done = await arun(env, "gap", "close", "dcir", "target", "--reason", "ok", "--by", "dan")
    assert done.returncode == 0, done.stderr
    done = await arun(env, "stage", "dcir", "shadow", "--reason", "go")
    assert done.returncode == 0, done.stderr
    assert (await admin.store.get("dcir")).stage is SH
