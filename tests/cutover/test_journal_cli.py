"""`bascule journal …` and the backlog in `bascule status`, on real entries."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import orjson
import pytest

from bascule.sealing import Namer, Sealer
from bascule.state.journal import Journal
from bascule.state.journal import queries as journal_module
from refapi.lab import OPERATOR_TOKEN, migrate_state
from tests.cutover.test_admin_and_cli import Admin, admin, arun
from tests.harness import cli_env as harness_cli_env
from tests.harness import run_cli

KEY = bytes(range(32))


@pytest.fixture
async def entries(pg_url: str) -> dict[str, int]:
    """One pending, one dead and one in-doubt entry of dcir."""
    await migrate_state(pg_url)
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
    j = Journal(pool, Sealer(KEY), replica="t")
    namer = Namer(KEY)
    seqs = {}
    for name, key in (("pending", "1"), ("dead", "2"), ("in_doubt", "3")):
        token = namer.record("dcir", key)
        async with j.locked("dcir", [token]) as session:
            seq = await session.intent(
                record=token,
                route="/v1/datasets/{dataset}/records/{id}",
                method="PATCH",
                authority="source",
                stage_version=2,
                request={"target": f"/v1/datasets/dcir/records/{key}", "body": "e30="},
            )
            await session.decide(seq, "in_doubt" if name == "in_doubt" else "pending", status=200)
        if name == "dead":
            await j.dead(seq, "the other side answered 409")
        seqs[name] = seq
    await pool.close()
    return seqs


@pytest.fixture
def env(tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    return harness_cli_env(tmp_path, pg_url, redis_url, redis_prefix)


run = run_cli
__all__ = ["admin"]  # the admin API fixture, shared


def test_status_and_journal_status_show_the_backlog(
    entries: dict[str, int], env: dict[str, str]
) -> None:
    status = orjson.loads(run(env, "status", "--json").stdout)
    dcir = next(d for d in status["datasets"] if d["dataset"] == "dcir")
    assert (dcir["backlog"], dcir["in_doubt"], dcir["dead"]) == (1, 1, 1)
    assert dcir["oldest_pending_seconds"] >= 0
    table = run(env, "status").stdout
    assert "backlog" in table and "dead" in table
    journal = orjson.loads(run(env, "journal", "status", "--json").stdout)["journal"]
    assert {r["dataset"]: r["dead"] for r in journal}["dcir"] == 1
    assert {r["dataset"]: r["backlog"] for r in journal}["pmsi"] == 0


@pytest.mark.parametrize("via", ["stores", "admin API"])
async def test_list_retry_and_skip(
    entries: dict[str, int], env: dict[str, str], admin: Admin, via: str
) -> None:
    if via == "admin API":  # the same commands, through a proxy's admin port and its token
        env = {**env, "BASCULE_ADMIN_URL": admin.url, "BASCULE_ADMIN_TOKEN": OPERATOR_TOKEN}
    done = await arun(env, "journal", "list", "--state", "dead", "--json")
    dead = orjson.loads(done.stdout)
    assert [e["seq"] for e in dead["entries"]] == [entries["dead"]]
    assert dead["entries"][0]["last_error"] == "the other side answered 409"
    listing = (await arun(env, "journal", "list", "--state", "in-doubt")).stdout
    assert str(entries["in_doubt"]) in listing and "e30=" not in listing  # no body, ever
    backlog = orjson.loads((await arun(env, "journal", "status", "dcir", "--json")).stdout)
    assert backlog["journal"][0]["dead"] == 1
    done = await arun(env, "journal", "retry", str(entries["dead"]))
    assert done.returncode == 0 and "1 dead entry sent back" in done.stdout, done.stderr
    assert (await arun(env, "journal", "retry", str(entries["dead"]))).returncode == 3  # not dead
    assert (await arun(env, "journal", "retry")).returncode == 2  # neither SEQ nor --all-dead
    refused = await arun(env, "journal", "skip", str(entries["in_doubt"]))
    assert refused.returncode == 2 and "a reason is required" in refused.stderr
    done = await arun(
        env, "journal", "skip", str(entries["in_doubt"]), "--reason", "checked", "--by", "alice"
    )
    assert done.returncode == 0, done.stderr
    history = orjson.loads((await arun(env, "history", "dcir", "--json")).stdout)["history"]
    last = history[-1]
    # The skipped write may be missing on the target: its gap (open since registration here)
    # stays open, recorded with the entry's state before the skip.
    skipped = {"seq": entries["in_doubt"], "was": "in_doubt", "gap": "target", "gap_opened": False}
    if via == "stores":
        assert (last["action"], last["actor"], last["details"]) == (
            "journal-skip",
            "alice",
            skipped,
        )
    else:  # the audit names the token's owner, and whom it acted for
        assert (last["action"], last["actor"], last["details"]) == (
            "journal-skip",
            "operator",
            {**skipped, "via": "admin-api", "on_behalf_of": "alice"},
        )
    again = await arun(env, "journal", "skip", str(entries["in_doubt"]), "--reason", "x")
    assert again.returncode == 3


async def test_settled_entries_are_purged_after_retention(
    entries: dict[str, int], pg_url: str
) -> None:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=2)
    try:
        j = Journal(pool, Sealer(KEY), replica="t")
        await j.applied(entries["pending"])
        assert await journal_module.purge(pool, 3600) == 0  # too recent
        assert await journal_module.purge(pool, 0) == 1
        left = {r["state"] for r in await pool.fetch("SELECT state FROM bascule_journal")}
        assert left == {"dead", "in_doubt"}  # unsettled entries are never purged
    finally:
        await pool.close()
