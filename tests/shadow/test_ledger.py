"""The divergence ledger on real Postgres and Redis: counters in time buckets, every mismatch
kept in Postgres, grouped by pointer for `bascule divergence` — and still reported when Redis
has lost everything."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from bascule.config import CompareRules
from shadow.compare import Answer, compare, compile_rules
from shadow.ledger import Ledger, divergence
from tests.harness import cli_env, run_cli

PLANTED = "P00c0ffee0000beef"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def ledger(
    state_pool: asyncpg.Pool, redis_url: str, redis_prefix: str
) -> AsyncIterator[Ledger]:
    client = aioredis.Redis.from_url(redis_url)
    yield Ledger(state_pool, client, redis_prefix, clock=Clock())
    await client.aclose()


def diff_of(serving: dict[str, object], other: dict[str, object]):  # type: ignore[no-untyped-def]
    rules = compile_rules(CompareRules())
    return compare(
        Answer(200, {"content-type": "application/json"}, orjson.dumps(serving)),
        Answer(200, {"content-type": "application/json"}, orjson.dumps(other)),
        rules,
        token=lambda name: "t" + str(abs(hash(name)) % 10**8),
    )


async def test_counters_add_up_across_buckets_and_routes(ledger: Ledger) -> None:
    clock: Clock = ledger.clock
    start = clock.now
    await ledger.count("dcir", "/r/{id}", "compared", 3)
    await ledger.count("dcir", "/r/{id}", "matched", 2)
    clock.now += 120  # two buckets later
    await ledger.count("dcir", "/q", "compared")
    await ledger.count("dcir", "/q", "skipped_raced")
    await ledger.count("pmsi", "/q", "compared", 7)  # another dataset
    totals = await ledger.counts("dcir", since=start)
    assert (totals["compared"], totals["matched"], totals["skipped_raced"]) == (4, 2, 1)
    assert (await ledger.counts("dcir", since=clock.now))["compared"] == 1
    per_route = await ledger.redis.hget(
        f"{ledger.prefix}ledger:dcir:{int(start) // 60 * 60}", "/r/{id}|compared"
    )
    assert per_route is not None and int(per_route) == 3


async def test_mismatches_are_kept_and_grouped_by_pointer_even_after_redis_lost_them(
    ledger: Ledger, redis_url: str, redis_prefix: str
) -> None:
    changed = diff_of(
        {"records": [{"id": 1, "amount": 10}], "n": 1},
        {"records": [{"id": 1, "amount": 11}], "n": 1},
    )
    missing = diff_of({"records": [{"id": 1}, {"id": 2}]}, {"records": [{"id": 1}]})
    for n in range(3):
        await ledger.mismatch("dcir", "/v1/datasets/{dataset}/records", changed, f"trace-{n}")
    await ledger.mismatch("dcir", "/v1/datasets/{dataset}/query", missing, "trace-x")
    assert (await ledger.counts("dcir", since=0))["mismatched"] == 4
    async for key in ledger.redis.scan_iter(match=redis_prefix + "*"):  # Redis lost it all
        await ledger.redis.delete(key)
    assert (await ledger.counts("dcir", since=0))["mismatched"] == 0
    grouped = await divergence(ledger.pool, "dcir")
    assert [(g["pointer"], g["kind"], g["count"]) for g in grouped] == [
        ("/records/0/amount", "changed", 3),
        ("/records/1", "missing", 1),
    ]
    assert grouped[0]["trace_ids"] == ["trace-2", "trace-1", "trace-0"]
    assert grouped[0]["routes"] == ["/v1/datasets/{dataset}/records"]
    assert await divergence(ledger.pool, "pmsi") == []


async def test_a_planted_value_is_nowhere_in_the_ledger_or_the_cli(
    ledger: Ledger, tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str
) -> None:
    planted = diff_of(
        {"by_patient": {PLANTED: {"amount": 1}}, "n": 1},
        {"by_patient": {PLANTED: {"amount": 2}}, "n": 2},
    )
    await ledger.mismatch("dcir", "/v1/datasets/{dataset}/query", planted, "trace-p")
    dump = " ".join(
        str(v)
        for row in await ledger.pool.fetch("SELECT * FROM bascule_mismatch")
        for v in row.values()
    )
    assert PLANTED not in dump and "/n" in dump
    env = cli_env(tmp_path, pg_url, redis_url, redis_prefix)
    shown = run_cli(env, "divergence", "dcir", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = orjson.loads(shown.stdout)["divergence"]
    assert {r["pointer"] for r in rows} >= {"/n"} and PLANTED not in shown.stdout
    table = run_cli(env, "divergence", "dcir")
    assert "trace-p" in table.stdout and PLANTED not in table.stdout
    unknown = run_cli(env, "divergence", "nope")
    assert unknown.returncode == 3 and "nope" in unknown.stderr
