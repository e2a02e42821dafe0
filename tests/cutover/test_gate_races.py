"""The gate and the controller under races, clocks and bad requests: each test here failed
before its fix, and shows a way a dataset could have moved forward (or the controller acted)
against the promise of docs/decisions.md (*The gate*, *The controller*, *Dataset groups*).

Real Postgres and Redis throughout; the SRE's side runs the real ``bascule`` command where the
interleaving allows it (a flip waiting at its barrier is seconds long: an operator's command
fits in it). Each docstring tells the failure as it was found."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from bascule.config import GateSettings, SwitchSettings, load_config
from bascule.errors import StoreError
from bascule.sealing import fence_id
from bascule.stages import Side, Stage
from bascule.state import leases
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageRow
from bascule.tasks import spawn
from cutover.autopilot import LEASE, Autopilot
from cutover.controller import Group
from cutover.gate import Gate, gates_of
from cutover.switch import Switcher
from shadow.diff import Diff, Difference
from shadow.ledger import Ledger
from shadow.tally import Tally
from tests.cutover.conftest import ROUTE, Gated, led
from tests.cutover.test_admin_and_cli import arun

pytestmark = pytest.mark.timeout(60)

SETTINGS = GateSettings(min_compared=5, window=60, replay_grace=5)
DIFF = Diff((Difference("body", "/record/amount", "changed"),))


# --- helpers ---------------------------------------------------------------------------------


def hold_longer(world: Gated, seconds: float = 20.0) -> None:
    """Give the flip's barrier time (``[switch] hold``) so that the interleaving below never
    depends on a slow machine (the default drain is 5 s; the wait for a small backlog before
    it, 60 s)."""
    world.config.write_text(world.config.read_text() + f"\n[switch]\nhold = {seconds}\n")


async def pending_toward_target(world: Gated) -> int:
    """A researcher's write applied by the source (the authority in ``shadow``), its replay to
    the target pending, young (within ``replay_grace``: not a backlog for the gate)."""
    await world.entry("pending", age=1.0)
    seq: int = await world.pool.fetchval("SELECT max(seq) FROM bascule_journal")
    return seq


async def fence_held(pool: asyncpg.Pool, dataset: str, within: float = 15.0) -> None:
    """Until some session holds ``dataset``'s write fence (the flip is at its barrier)."""
    key = fence_id(dataset) & 0xFFFFFFFFFFFFFFFF
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        held = await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objsubid = 1 AND classid = $1::bigint::oid AND objid = $2::bigint::oid",
            key >> 32,
            key & 0xFFFFFFFF,
        )
        if held:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{dataset}'s fence was never taken")


@asynccontextmanager
async def side_pool(world: Gated) -> AsyncIterator[asyncpg.Pool]:
    """A second small pool: the fixture's has two sessions, the switch holds one."""
    url = load_config(world.config).state.postgres_url
    assert url is not None
    pool = await open_pool(url, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


class Heard:
    """An announcer that records what it was told (and may run something when it is)."""

    def __init__(self, then: Callable[[StageRow], Awaitable[None]] | None = None) -> None:
        self.rows: list[StageRow] = []
        self.then = then

    async def announce(self, row: StageRow) -> bool:
        self.rows.append(row)
        if self.then is not None:
            await self.then(row)
        return True


def pilot(
    world: Gated,
    replica: str = "r1",
    *,
    pool: asyncpg.Pool | None = None,
    auto: dict[str, bool] | None = None,
    budgets: dict[str, int] | None = None,
    switch: SwitchSettings | None = None,
    announcer: Heard | None = None,
    groups: dict[str, Group] | None = None,
    settings: dict[str, GateSettings] | None = None,
    lease: float = 1.0,
) -> Autopilot:
    from bascule.state.stage_store import StageStore

    pool = pool or world.pool
    return Autopilot(
        StageStore(pool),
        announcer or Heard(),
        Switcher(pool, switch or SwitchSettings()),
        Gate(pool, settings or {"dcir": SETTINGS}),
        replica,
        auto_promote=auto if auto is not None else {"dcir": True},
        budgets=budgets or {},
        interval=0.1,
        lease=lease,
        groups=groups,
    )


async def gate_holding(world: Gated, dataset: str) -> None:
    """``dataset`` (other than dcir) brought to ``shadow`` with its own evidence, like dcir."""
    store = world.store
    row = await store.change(dataset, 1, Stage.DUALWRITE, actor="setup", reason="setup")
    await store.close_gap(dataset, Side.TARGET, actor="setup", reason="verified below")
    row = await store.change(dataset, row.version, Stage.SHADOW, actor="setup", reason="setup")
    await world.sql(
        "UPDATE bascule_stage SET updated_at = now() - interval '2 minutes' WHERE dataset = $1",
        dataset,
    )
    await world.sql(
        "INSERT INTO bascule_verify_run (dataset, mode, status, verified, authority, stage,"
        " stage_version, actor, started_at, swept_since, finished_at) VALUES ($1, 'full',"
        " 'clean', 'target', 'source', 'dualwrite', 2, 'setup', now(), now(), now())",
        dataset,
    )
    await world.sql(
        "INSERT INTO bascule_shadow_count (dataset, stage_version, route, outcome, minute, n)"
        " VALUES ($1, $2, $3, 'compared', date_trunc('minute', now()), 10)",
        dataset,
        row.version,
        ROUTE,
    )


# --- 1. a gap opened while the flip waits at its barrier ---------------------------------------


async def test_a_skip_during_the_flips_barrier_refuses_the_flip(
    gated: Gated,
) -> None:
    """The SRE's flip `shadow -> live` waits at its barrier for a replay that is stuck; the SRE
    (or a colleague) skips it — `journal skip` opens the target's gap, without bumping the
    stage's version. The drain then sees zero, the compare-and-set on the version passes, and
    the target serves with an open gap: the gap rule and the gate's `gap` and `verified`
    conditions were judged before the barrier and never again."""
    hold_longer(gated)
    seq = await pending_toward_target(gated)
    flip = spawn(arun(gated.env, "stage", "dcir", "live", "--reason", "CHG-1"), name="flip")
    try:
        await fence_held(gated.pool, "dcir")
        skipped = await arun(gated.env, "journal", "skip", str(seq), "--reason", "stuck replay")
        assert skipped.returncode == 0, skipped.stderr
    finally:
        done = await flip
    row = await gated.store.get("dcir")
    assert Side.TARGET in row.gaps  # the skip did open the target's gap
    assert row.stage is Stage.SHADOW, (
        f"flip exit {done.returncode}: dcir is {row.stage.value} with the target (which serves "
        f"in live) gapped since {row.gaps[Side.TARGET]}, audited forced="
        f"{(await gated.store.history('dcir'))[-1].forced}"
    )


# --- 2. evidence that lands while the flip waits at its barrier --------------------------------


async def test_a_mismatch_recorded_during_the_flips_barrier_refuses_it(
    gated: Gated, redis_url: str, redis_prefix: str
) -> None:
    """Reads are not fenced: shadow reads go on while the flip waits for its backlog. A
    mismatch found and written by a replica's tally at that moment, under `shadow`'s version,
    before the commit, is not seen: the gate was judged once, before the barrier, and the
    compare-and-set only checks the version (which evidence never bumps)."""
    hold_longer(gated)
    seq = await pending_toward_target(gated)
    version = await gated.version()
    flip = spawn(arun(gated.env, "stage", "dcir", "live", "--reason", "CHG-2"), name="flip")
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await fence_held(gated.pool, "dcir")
        async with side_pool(gated) as pool:
            # A replica's tally writes the mismatch it found (served under shadow's version)...
            await Ledger(pool, redis, redis_prefix).mismatch(
                "dcir", ROUTE, DIFF, "trace-1", version=version
            )
            # ...and the replayer lands the pending write: the drain is done.
            await pool.execute(
                "UPDATE bascule_journal SET state = 'applied', applied_at = now() WHERE seq = $1",
                seq,
            )
    finally:
        done = await flip
        await redis.aclose()
    row = await gated.store.get("dcir")
    found = await gated.pool.fetchval(
        "SELECT count(*) FROM bascule_mismatch WHERE dataset = 'dcir' AND stage_version = $1",
        version,
    )
    assert found == 1  # recorded under shadow's version, while the flip waited
    assert done.returncode == 3, done.stdout + done.stderr
    assert row.stage is Stage.SHADOW, (
        f"flip exit {done.returncode}: promoted to live with {found} mismatch under "
        f"shadow (version {version}) recorded before the commit; audited gate figures: "
        f"{(await gated.store.history('dcir'))[-1].details.get('gate')}"
    )


# --- 3. the controller: its lease runs out while its move waits at the barrier ----------------


async def test_a_controller_whose_lease_ran_out_mid_move_does_not_commit_it(gated: Gated) -> None:
    """r1 holds the controller's lease and starts promoting dcir; the authority switch waits
    at its barrier (by default up to backlog_wait 60 s + hold 5 s, against a lease of 15 s).
    Its lease runs out and r2 takes it over — r2 is now the fleet's controller — yet r1,
    never looking at its lease again, commits the promotion: two controllers acting at once."""
    await pending_toward_target(gated)
    async with side_pool(gated) as pool:
        r1 = pilot(gated, "r1", pool=pool, lease=1.0, switch=SwitchSettings(hold=20))
        round_ = spawn(led(r1), name="r1-round")  # r1 takes the lease, and starts a round
        try:
            await fence_held(gated.pool, "dcir")
            await asyncio.sleep(r1.lease + 0.3)
            # r1's lease has run out: r2, the next replica, takes it over.
            assert await leases.take(gated.pool, LEASE, "r2", 15.0)
            assert await leases.holder(gated.pool, LEASE) == "r2"
            # The replayer lands the write r1's switch was waiting for.
            await gated.sql(
                "UPDATE bascule_journal SET state = 'applied', applied_at = now()"
                " WHERE state = 'pending'"
            )
        finally:
            done = await round_
    row = await gated.store.get("dcir")
    last = (await gated.store.history("dcir"))[-1]
    assert row.stage is Stage.SHADOW, (
        f"{[(a.dataset, a.did) for a in done]}: r1 committed {last.from_stage} -> "
        f"{last.to_stage} (audited replica {last.details.get('replica')!r}) while r2 held "
        "the controller's lease"
    )


# --- 4. the controller: auto_promote turned off while its move waits at the barrier -----------


async def test_auto_promote_turned_off_during_the_controllers_move_refuses_it(
    gated: Gated,
) -> None:
    """An operator freezes dcir (`bascule auto-promote dcir off`) while the controller's
    promotion waits at the barrier: `set_auto_promote` does not bump the version, the move never
    looks at auto_promote again, and the controller promotes a dataset whose auto_promote is
    off (the audit then shows `auto-promote off` by the operator, *before* the controller's
    `shadow -> live` 'auto_promote: the gate holds')."""
    await pending_toward_target(gated)
    async with side_pool(gated) as pool:
        r1 = pilot(gated, "r1", pool=pool, switch=SwitchSettings(hold=20))
        round_ = spawn(led(r1), name="r1-round")
        try:
            await fence_held(gated.pool, "dcir")
            off = await arun(
                gated.env, "auto-promote", "dcir", "off", "--reason", "freeze for the audit"
            )
            assert off.returncode == 0, off.stderr
            await gated.sql(
                "UPDATE bascule_journal SET state = 'applied', applied_at = now()"
                " WHERE state = 'pending'"
            )
        finally:
            await round_
    row = await gated.store.get("dcir")
    history = [(h.actor, h.action, h.to_stage) for h in await gated.store.history("dcir")][-2:]
    assert row.auto_promote is False
    assert row.stage is Stage.SHADOW, f"promoted with auto_promote off: {history}"


# --- 5. the controller rolls back on a stale row ----------------------------------------------


async def test_the_controller_does_not_roll_back_on_the_stale_row_of_its_round(
    gated: Gated,
) -> None:
    """A round reads every row once, then takes its datasets one by one; a promotion can take
    tens of seconds (the barrier, the replicas' confirmations). Meanwhile on-call handles pmsi:
    rolls it back (the page) and, the divergence explained, promotes it again — a new `live`,
    version v+2, with no mismatch. The round then reaches pmsi with its stale row (live at v,
    over budget) and rolls the clean v+2 back: `controller.rollback` is given no expected
    version, so it moves whatever stage is there now."""
    await gate_holding(gated, "pmsi")
    pmsi = await gated.store.get("pmsi")
    pmsi = await gated.store.change("pmsi", pmsi.version, Stage.LIVE, actor="setup", reason="s")
    await gated.sql(
        "INSERT INTO bascule_mismatch (dataset, route, differences, stage_version)"
        " VALUES ('pmsi', $1, '[]', $2)",
        ROUTE,
        pmsi.version,
    )

    async def on_call(row: StageRow) -> None:
        if row.dataset != "dcir":
            return
        # pmsi's gate is the lab's open one ([defaults.gate]): no force needed.
        back = await arun(gated.env, "rollback", "pmsi", "--reason", "PAGE: divergence")
        again = await arun(gated.env, "stage", "pmsi", "live", "--reason", "explained, go")
        assert back.returncode == 0 and again.returncode == 0, back.stderr + again.stderr

    async with side_pool(gated) as pool:
        r1 = pilot(
            gated,
            pool=pool,
            auto={"dcir": True, "pmsi": False},
            budgets={"pmsi": 0},
            announcer=Heard(then=on_call),
        )
        done = await led(r1)
    row = await gated.store.get("pmsi")
    assert row.version == pmsi.version + 2  # rolled back and promoted again by on-call only
    assert [a.did for a in done if a.dataset == "pmsi"] == ["refused"]
    offs = [h for h in await gated.store.history("pmsi") if h.actor == "controller"]
    assert offs == []  # nor turned its auto_promote off on the stale row
    clean = await gated.pool.fetchval(
        "SELECT count(*) FROM bascule_mismatch WHERE dataset = 'pmsi' AND stage_version = $1",
        pmsi.version + 2,
    )
    assert row.stage is Stage.LIVE, (
        f"{[(a.dataset, a.did, a.detail) for a in done]}: the controller rolled back pmsi's "
        f"live version {pmsi.version + 2} ({clean} mismatches) on version {pmsi.version}'s"
    )


# --- 6. a group promoted by the controller although a member's auto_promote is off ------------


async def test_the_controller_moves_a_group_only_if_every_member_auto_promotes(
    gated: Gated,
) -> None:
    """dcir and pmsi are one group; only dcir has auto_promote on (pmsi's is off: configured
    so, or turned off for pmsi alone before the group was declared). The controller looks at
    dcir, its gate holding, and moves the group — pmsi with it."""
    await gate_holding(gated, "pmsi")
    care = Group("care", ("dcir", "pmsi"))
    r1 = pilot(
        gated,
        auto={"dcir": True, "pmsi": False},
        groups={"dcir": care, "pmsi": care},
        settings={"dcir": SETTINGS, "pmsi": SETTINGS},
    )
    done = await led(r1)
    rows = await gated.store.all()
    assert r1.promotes(rows["pmsi"]) is False
    assert rows["pmsi"].stage is Stage.SHADOW, (
        f"{[(a.dataset, a.did) for a in done]}: pmsi (auto_promote off) moved to "
        f"{rows['pmsi'].stage.value} by {rows['pmsi'].updated_by}"
    )


# --- 7. an operator's rollback leaves auto_promote on: the controller flaps it back ----------


async def test_an_operators_rollback_turns_auto_promote_off(
    gated: Gated,
) -> None:
    """docs/decisions.md, *The controller*: "No flapping: after a rollback `auto_promote` is
    off". Only the controller's own rollback turns it off: on-call rolling dcir back from
    `live` for a reason comparisons cannot see (the target's latency, researchers' reports),
    with `auto_promote = true` configured, gets it promoted again by the controller as soon as
    the new shadow stage's window has passed."""
    up = await arun(gated.env, "stage", "dcir", "live", "--reason", "CHG-6")
    assert up.returncode == 0, up.stderr
    back = await arun(gated.env, "rollback", "dcir", "--reason", "PAGE: target too slow")
    assert back.returncode == 0, back.stderr
    # An hour later (the window), the new shadow stage has its evidence again.
    await gated.sql("UPDATE bascule_stage SET updated_at = now() - interval '2 minutes'")
    await gated.counted(ROUTE, "compared", 10)
    assert (await gated.store.get("dcir")).auto_promote is False  # the rollback turned it off
    done = await led(pilot(gated))
    row = await gated.store.get("dcir")
    assert row.stage is Stage.SHADOW, (
        f"{[(a.dataset, a.did) for a in done]}: rolled back by on-call, promoted again by the "
        f"controller ({row.updated_by}: {row.reason})"
    )


# --- 8. the window measured on the judging machine's clock -----------------------------------


async def test_the_gate_judges_on_the_databases_clock_not_the_replicas(
    gated: Gated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`updated_at` and every piece of evidence are on the state database's clock; the gate's
    `now` is the judging process's own (`datetime.now`). On a replica (every one runs the
    controller) or an SRE's laptop whose clock is 58 s fast, `shadow`, in effect for 5 s, has
    'been in effect for the 60 s window', and the evidence window starts 58 s late: a
    mismatch found 2 s after the flip no longer counts."""
    await gated.sql("UPDATE bascule_stage SET updated_at = now() - interval '5 seconds'")
    version = await gated.version()
    await gated.sql(
        "INSERT INTO bascule_mismatch (at, dataset, route, differences, stage_version)"
        " VALUES (now() - interval '3 seconds', 'dcir', $1, '[]', $2)",
        ROUTE,
        version,
    )
    await gated.counted(ROUTE, "compared", 10)  # this minute's, as written by a tally

    class Fast(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.now(tz) + timedelta(seconds=58)

    monkeypatch.setattr("cutover.gate.datetime", Fast)
    gate = gates_of(load_config(gated.config), gated.pool)  # what a replica or the CLI builds
    report = await gate.judge(await gated.store.get("dcir"))
    figures = report.figures()
    assert not report.ok, (
        f"the gate holds for a shadow stage 5 s old with a mismatch under it: window "
        f"{figures['window']} s, mismatches {figures['mismatches']}"
    )


# --- 9. the evidence's minute stamped with the writing replica's clock -------------------------


async def test_errored_comparisons_are_stamped_on_the_databases_clock(
    gated: Gated, redis_url: str, redis_prefix: str
) -> None:
    """The tally's Postgres rows (`bascule_shadow_error`, `bascule_shadow_count`) are stamped
    with the replica's `time.time()` minute, while the gate reads them from a start on the
    database's clock. A replica whose clock is 10 minutes slow writes its errored comparisons
    10 minutes in the past, before the window: the gate sees zero."""
    version = await gated.version()
    redis = aioredis.Redis.from_url(redis_url)
    try:
        ledger = Ledger(gated.pool, redis, redis_prefix, clock=lambda: time.time() - 600)
        tally = Tally()
        for _ in range(3):
            tally.count("dcir", ROUTE, "errored", version)
            tally.error("dcir", ROUTE, "shadow_timeout", version)
        await tally.flush(ledger)
    finally:
        await redis.aclose()
    stored = await gated.pool.fetchval(
        "SELECT sum(n) FROM bascule_shadow_error WHERE dataset = 'dcir' AND stage_version = $1",
        version,
    )
    assert stored == 3  # the evidence is in Postgres, under this stage version
    gate = gates_of(load_config(gated.config), gated.pool)
    report = await gate.judge(await gated.store.get("dcir"))
    errored = next(c for c in report.conditions if c.name == "errored")
    assert not errored.ok, (
        f"3 errored comparisons under version {version}, the gate counts {errored.figure}; "
        f"gate ok={report.ok}"
    )


# --- 10. a flush retried after an unanswered commit counts twice --------------------------------


async def test_a_flush_retried_after_an_unanswered_commit_counts_once(
    gated: Gated, redis_url: str, redis_prefix: str
) -> None:
    """`Tally._flush` puts the gate's counts back whenever `gate_counts` raises: when the
    INSERT did commit but its answer was lost (a connection reset after the commit), the
    next flush adds them again. 5 comparisons become 10, enough for a gate wanting 10."""
    await gated.sql("DELETE FROM bascule_shadow_count")
    version = await gated.version()

    class AnswerLost(Ledger):
        lost = 0

        async def gate_counts(self, counts: Any, **where: Any) -> None:
            await super().gate_counts(counts, **where)
            if not self.lost:
                self.lost += 1
                raise StoreError("the state Postgres is unreachable (ConnectionResetError)")

    redis = aioredis.Redis.from_url(redis_url)
    try:
        ledger = AnswerLost(gated.pool, redis, redis_prefix)
        tally = Tally()
        for _ in range(5):
            tally.count("dcir", ROUTE, "compared", version)
        with pytest.raises(StoreError):
            await tally.flush(ledger)
        await tally.flush(ledger)  # the next second's flush
    finally:
        await redis.aclose()
    gate = Gate(gated.pool, {"dcir": GateSettings(min_compared=10, window=60)})
    report = await gate.judge(await gated.store.get("dcir"))
    volume = next(c for c in report.conditions if c.name == "volume")
    assert volume.figure == 5, f"5 comparisons made, {volume.figure} counted (ok={volume.ok})"


# --- 11. a later skip folded into a gap already open ------------------------------------------


async def test_a_write_skipped_while_a_gap_is_open_is_a_new_miss_for_verified(
    gated: Gated,
) -> None:
    """`open_gap` keeps the older `gap_target_opened` when the gap is already open. A first
    skip opens the target's gap (T1); a clean verification follows (V > T1; an incremental
    one, which closes no gap); a second write is skipped at T2 > V — the target now also lacks
    a write no verification has seen, but `gap_target_opened` stays T1. The gap is closed (on
    an SRE's word here; a full verification that began before T2 closes it too, since it only
    compares the gap's *since* with its start): `verified` holds on V, and the flip passes."""
    first = await pending_toward_target(gated)
    done = await arun(gated.env, "journal", "skip", str(first), "--reason", "gave up on 1")
    assert done.returncode == 0, done.stderr
    await gated.sql(
        "INSERT INTO bascule_verify_run (dataset, mode, status, verified, authority, stage,"
        " stage_version, actor, started_at, swept_since, finished_at) VALUES ('dcir',"
        " 'incremental', 'clean', 'target', 'source', 'shadow', $1, 'sre', now(), now(), now())",
        await gated.version(),
    )
    await asyncio.sleep(0.05)
    second = await pending_toward_target(gated)
    done = await arun(gated.env, "journal", "skip", str(second), "--reason", "gave up on 2")
    assert done.returncode == 0, done.stderr
    skip = (await gated.store.history("dcir"))[-1]
    assert (skip.action, skip.details["gap"], skip.details["gap_opened"]) == (
        "journal-skip",
        "target",
        False,
    )
    closed = await arun(gated.env, "gap", "close", "dcir", "target", "--reason", "checked by hand")
    assert closed.returncode == 0, closed.stderr
    flip = await arun(gated.env, "stage", "dcir", "live", "--reason", "CHG-10")
    verification = await gated.pool.fetchval(
        "SELECT max(swept_since) FROM bascule_verify_run WHERE status = 'clean'"
    )
    assert flip.returncode == 3, (
        f"dcir promoted on a verification ({verification}) older than the write skipped at "
        f"{skip.at}: {flip.stdout}"
    )


# --- 12. a newer verification that found divergences does not count ------------------------


async def test_the_gate_refuses_while_the_latest_verification_found_divergences(
    gated: Gated,
) -> None:
    """`verified` reads `bascule_verify_latest_clean`: the latest *clean* run. A full run made
    after it that found records missing on the target (status `divergent`) opens no gap and
    is not looked at: the gate holds, and the flip passes, on a clean run the stored data
    has since been shown to contradict."""
    await gated.sql(
        "INSERT INTO bascule_verify_run (dataset, mode, status, verified, authority, stage,"
        " stage_version, actor, started_at, swept_since, finished_at, figures) VALUES ('dcir',"
        " 'full', 'divergent', 'target', 'source', 'shadow', $1, 'sre', now(), now(), now(),"
        " '{\"missing\": 3}')",
        await gated.version(),
    )
    flip = await arun(gated.env, "stage", "dcir", "live", "--reason", "CHG-10b")
    assert flip.returncode == 3, (
        "promoted although the latest verification found 3 records missing on the target: "
        + flip.stdout
    )


# --- 13. the upgrade to the gate forgets every gap already closed ----------------------------


async def test_the_gate_migration_does_not_forget_gaps_closed_before_it(make_database: Any) -> None:
    """Migration 0008 sets `gap_*_opened` from `gap_*_since` — NULL for every gap closed
    before the upgrade, by a verification or on an SRE's word. A dataset that was rolled
    back to `source` (the target missed writes), whose gap an SRE then closed by hand, comes
    out of the upgrade with no gap history: the gate's `verified` accepts a verification from
    before the writes were missed. The audit trail has the history the migration ignores."""
    from bascule.state import schema

    url = await make_database("upgrade")
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE bascule_schema (version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        before_gate = [m for m in schema.migrations() if m.version < 8]  # before "gate"
        assert [m.version for m in before_gate] == list(range(1, 8))
        for m in before_gate:
            async with conn.transaction():
                await conn.execute(m.path.read_text())
                await conn.execute(
                    "INSERT INTO bascule_schema (version, name) VALUES ($1, $2)", m.version, m.name
                )
        # Before the upgrade: verified clean an hour ago; rolled back to source half an hour
        # ago (the target's gap opened: it missed the writes made then); forward again; the
        # gap closed on an SRE's word; now in shadow.
        await conn.execute(
            "INSERT INTO bascule_stage (dataset, stage, version, updated_by, reason, updated_at,"
            " gap_target_since) VALUES ('dcir', 'shadow', 9, 'sre', 'x',"
            " now() - interval '10 minutes', NULL)"
        )
        await conn.execute(
            "INSERT INTO bascule_verify_run (dataset, mode, status, verified, authority, stage,"
            " stage_version, actor, started_at, swept_since, finished_at) VALUES ('dcir', 'full',"
            " 'clean', 'target', 'source', 'dualwrite', 4, 'sre', now() - interval '1 hour',"
            " now() - interval '1 hour', now() - interval '50 minutes')"
        )
        for at, action, to, details in (
            (30, "rollback", "source", '{"gaps_opened": ["target"]}'),
            (25, "stage", "dualwrite", "{}"),
            (20, "gap-close", None, '{"side": "target"}'),
            (10, "stage", "shadow", "{}"),
        ):
            await conn.execute(
                "INSERT INTO bascule_audit (at, dataset, action, actor, to_stage, reason, details)"
                " VALUES (now() - make_interval(mins => $1), 'dcir', $2, 'sre', $3, 'x',"
                " $4::jsonb)",
                at,
                action,
                to,
                details,
            )
        applied = [m.name for m in await schema.migrate(conn)]
        assert applied[0] == "gate", applied  # the upgrade (and any later migration)
    finally:
        await conn.close()
    pool = await open_pool(url, max_size=1)
    try:
        from bascule.state.stage_store import StageStore

        row = await StageStore(pool).get("dcir")
        report = await Gate(pool, {"dcir": SETTINGS}).judge(row)
    finally:
        await pool.close()
    verified = next(c for c in report.conditions if c.name == "verified")
    assert not verified.ok, (
        f"after the upgrade, last gap opened = {row.last_gap_opened}; the gate accepts the "
        f"verification of {verified.figure}, older than the gap the audit records"
    )


# --- 14. the admin API: malformed requests ----------------------------------------------------


@asynccontextmanager
async def admin_api(world: Gated, redis_url: str, redis_prefix: str) -> AsyncIterator[str]:
    from bascule.app.admin import AdminDeps, create_admin_app
    from bascule.app.operations import Operations
    from bascule.state.fleet import RedisAnnouncer
    from refapi.lab import OPERATOR_TOKEN, VIEWER_TOKEN
    from tests.harness import serve_app

    redis = aioredis.Redis.from_url(redis_url)
    config = load_config(world.config)
    ops = Operations(
        world.store,
        RedisAnnouncer(redis, redis_prefix),
        Switcher(world.pool),
        gate=gates_of(config, world.pool),
    )
    deps = AdminDeps(ops, None, {"operator": OPERATOR_TOKEN}, VIEWER_TOKEN)
    try:
        async with serve_app(create_admin_app(deps)) as url:
            yield url
    finally:
        await redis.aclose()


async def test_a_divergence_query_with_an_infinite_since_is_a_400(
    gated: Gated, redis_url: str, redis_prefix: str
) -> None:
    """`since` is checked with `not since > 0`, which `inf` (and `1e300`) pass; then
    `timedelta(seconds=inf)` raises OverflowError, which no handler maps: a 500 with a
    traceback in the log, instead of the 400 every other bad query gets."""
    import aiohttp

    from tests.cutover.test_admin_and_cli import VIEW

    async with admin_api(gated, redis_url, redis_prefix) as url, aiohttp.ClientSession() as s:
        statuses = []
        for since in ("inf", "1e300"):
            async with s.get(f"{url}/v1/datasets/dcir/divergence?since={since}", headers=VIEW) as r:
                statuses.append(r.status)
    assert statuses == [400, 400]


async def test_an_auto_promote_request_that_names_no_state_is_refused(
    gated: Gated, redis_url: str, redis_prefix: str
) -> None:
    """`POST /v1/datasets/X/auto-promote` reads `on` with `_flag`, whose default is False: a
    body that forgets `on` (`{"reason": "…"}`) is not refused as `'stage' is required` is for
    a stage change — it turns auto_promote off, audited as the operator's decision."""
    from tests.cutover.test_admin_and_cli import OP, call

    await gated.store.set_auto_promote("dcir", True, actor="alice", reason="on")
    async with admin_api(gated, redis_url, redis_prefix) as url:
        status, body = await call(
            "POST", url + "/v1/datasets/dcir/auto-promote", OP, {"reason": "CHG-12"}
        )
    row = await gated.store.get("dcir")
    assert (status, row.auto_promote) == (400, True), (status, body, row.auto_promote)
