"""Dataset groups: datasets whose data depend on each other move through the stages together,
as one audited change, or not at all — through the real command."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from bascule.config import load_config
from bascule.stages import Side, Stage
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageStore
from cutover.controller import Group, groups_of
from refapi.lab import migrate_state, write_config
from tests.cutover.test_admin_and_cli import arun


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[StageStore]:
    await migrate_state(pg_url)
    pool = await open_pool(pg_url, max_size=2)
    yield StageStore(pool)
    await pool.close()


@pytest.fixture
async def env(
    tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str, store: StageStore
) -> dict[str, str]:
    path = tmp_path / "bascule.toml"
    write_config(
        path,
        source_url="http://127.0.0.1:9",
        target_url="http://127.0.0.1:9",
        postgres_url=pg_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
    )
    text = path.read_text()
    for name in ("dcir", "pmsi"):  # cepidc and default stay on their own
        text = text.replace(f"[datasets.{name}]\n", f'[datasets.{name}]\ngroup = "care"\n', 1)
    path.write_text(text)
    assert groups_of(load_config(path))["pmsi"] == Group("care", ("dcir", "pmsi"))
    return {**os.environ, "BASCULE_CONFIG": str(path)}


async def stages(store: StageStore) -> dict[str, Stage]:
    return {name: row.stage for name, row in (await store.all()).items()}


async def test_a_group_moves_together_as_one_audited_change(
    store: StageStore, env: dict[str, str]
) -> None:
    done = await arun(env, "stage", "dcir", "dualwrite", "--reason", "CHG-7", "--json")
    assert done.returncode == 0, done.stderr
    result = orjson.loads(done.stdout)
    assert result["group"]["name"] == "care"
    assert [m["dataset"] for m in result["group"]["moved"]] == ["dcir", "pmsi"]
    assert await stages(store) == {
        "default": Stage.SOURCE,
        "dcir": Stage.DUALWRITE,
        "pmsi": Stage.DUALWRITE,
        "cepidc": Stage.SOURCE,
    }
    audit = [h for h in await store.history() if h.action == "stage"]
    assert [(h.dataset, h.to_stage, h.reason) for h in audit] == [
        ("dcir", "dualwrite", "CHG-7"),
        ("pmsi", "dualwrite", "CHG-7"),
    ]
    assert audit[0].details["change"] == audit[1].details["change"]  # one change
    assert audit[0].details["members"] == ["dcir", "pmsi"]
    # The other member moves the group too, and so does a rollback.
    done = await arun(env, "rollback", "pmsi", "--reason", "back")
    assert done.returncode == 0, done.stderr
    assert (await stages(store))["dcir"] is Stage.SOURCE


async def test_a_group_moves_not_at_all_when_one_member_may_not(
    store: StageStore, env: dict[str, str]
) -> None:
    await arun(env, "stage", "pmsi", "dualwrite", "--reason", "both")
    # dcir's target is verified, pmsi's is not: shadow would compare pmsi against a side that
    # may miss writes, so neither moves.
    await store.close_gap("dcir", Side.TARGET, actor="t", reason="verified")
    before = (await store.all(), await store.history())
    done = await arun(env, "stage", "dcir", "shadow", "--reason", "try")
    assert done.returncode == 3
    assert "pmsi: cannot move dualwrite -> shadow: the target has had an open gap" in done.stderr
    assert (await store.all(), await store.history()) == before
    dry = await arun(env, "stage", "dcir", "shadow", "--dry-run", "--json")
    assert dry.returncode == 3
    checks = {c["check"]: c["ok"] for c in orjson.loads(dry.stdout)["checks"]}
    assert checks["gaps"] is True and checks["pmsi: gaps"] is False
    await store.close_gap("pmsi", Side.TARGET, actor="t", reason="verified")
    done = await arun(env, "stage", "dcir", "shadow", "--reason", "now both")
    assert done.returncode == 0, done.stderr
    assert {(await stages(store))[n] for n in ("dcir", "pmsi")} == {Stage.SHADOW}


async def test_a_group_split_across_stages_is_refused_with_what_to_do(
    store: StageStore, env: dict[str, str]
) -> None:
    # As after a group was added to the configuration of datasets moved apart before.
    await store.change("dcir", 1, Stage.DUALWRITE, actor="t", reason="before the group")
    done = await arun(env, "stage", "pmsi", "dualwrite", "--reason", "catch up")
    assert done.returncode == 3
    assert "its group 'care' is split across stages (dcir at dualwrite, pmsi at source)" in (
        done.stderr
    )
    assert (await stages(store))["pmsi"] is Stage.SOURCE
