"""Noise proposals: what differs between two answers of one side, as patterns (properties over
random JSON, then cases), counted per independent pair in Postgres, decided by an SRE (audited,
announced on Redis, read back from Postgres when Redis is away), through the store, the CLI
and the admin API — and refusals change nothing."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from bascule.app.admin import AdminDeps, create_admin_app
from bascule.app.operations import Operations
from bascule.config import CompareRules
from bascule.errors import Refused, UnknownDataset, UnknownProposal, UsageError
from bascule.state.fleet import RedisAnnouncer
from bascule.state.stage_store import StageStore
from bascule.tasks import spawn
from refapi.lab import OPERATOR_TOKEN, VIEWER_TOKEN
from shadow.compare import Answer, Rules, compare, compile_rules
from shadow.diff import PLAIN_NAME
from shadow.noise import Observation, covers_document, merge, observe
from shadow.noise_news import channel
from shadow.noise_store import NoiseStore
from shadow.pointers import WILDCARD, parse_pointer
from tests.cutover.test_admin_and_cli import arun, call
from tests.harness import cli_env, closed_port_url, run_cli, serve_app
from tests.shadow.test_compare import PROFILE, documents, names, respelled

_MISSING: Any = object()
PLAIN = compile_rules(CompareRules(headers=(), timestamps_as_instants=False))
DEFAULT = compile_rules(CompareRules())
PLANTED = "P00c0ffee0000beef"
ROUTE = "/v1/datasets/{dataset}/records"
QUERY = "/v1/datasets/{dataset}/query"
OP = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
VIEW = {"Authorization": f"Bearer {VIEWER_TOKEN}"}


def never_called(name: str) -> str:
    raise AssertionError("observe must not need a token: patterns hold none")


def seen(a: Any, b: Any, rules: Rules = PLAIN) -> list[Observation]:
    # The standard library's encoder: it writes integers beyond 64 bits.
    return observe(json.dumps(a).encode(), json.dumps(b).encode(), rules, never_called)


def ignore(pointer: str) -> Observation:
    return Observation(pointer, "ignore")


# --- properties ------------------------------------------------------------------------------

plain_names = st.sampled_from(["data", "page", "result", "items_2", "_meta"])


@st.composite
def keyed_records(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Records with unique ids (numbers or strings) and a few other fields of any kind."""
    ids = draw(
        st.lists(st.integers(-5, 10**12), unique=True, min_size=2, max_size=8)
        | st.lists(st.text(max_size=4), unique=True, min_size=2, max_size=8)
    )
    fields = draw(st.lists(names.filter(lambda n: n != "id"), unique=True, max_size=2))
    return [{"id": i, **{f: draw(documents) for f in fields}} for i in ids]


def at(where: tuple[str, ...], value: Any) -> Any:
    """``value`` under these member names, beside a sibling that stays the same."""
    for name in reversed(where):
        value = {name: value, "same": [1, "two"]}
    return value


def differs(a: Any, b: Any) -> bool:
    """Whether two values differ as JSON, by the comparison engine (``1`` is ``1.0``)."""
    encode = json.dumps
    return not compare(
        Answer(200, {}, encode(a).encode()), Answer(200, {}, encode(b).encode()), PLAIN, str
    ).equal


@PROFILE
@given(documents)
def test_a_document_against_itself_however_spelled_gives_nothing(doc: Any) -> None:
    spelled = json.dumps(respelled(doc), indent=1).encode()
    for rules in (PLAIN, DEFAULT):
        assert observe(json.dumps(doc).encode(), spelled, rules, never_called) == []


@PROFILE
@given(keyed_records(), st.lists(plain_names, max_size=2), st.data())
def test_reordering_an_array_proposes_unordered_never_an_ignore(
    records: list[dict[str, Any]], where: list[str], data: st.DataObject
) -> None:
    shuffled = copy.deepcopy(data.draw(st.permutations(records)))
    if [r["id"] for r in shuffled] == [r["id"] for r in records]:
        shuffled = shuffled[1:] + shuffled[:1]
    path = (*where, "records")
    expected = [Observation("".join(f"/{n}" for n in path), "unordered", "id")]
    assert seen(at(path, records), at(path, shuffled)) == expected
    assert seen(at(path, shuffled), at(path, records)) == expected
    # At the root, the pattern would cover the whole document: nothing is proposed.
    assert seen(records, shuffled) == []


@PROFILE
@given(
    keyed_records(),
    st.lists(plain_names, max_size=2),
    names.filter(lambda n: n != "id"),
    st.data(),
)
def test_a_changed_field_gives_exactly_its_generalized_pattern(
    records: list[dict[str, Any]], where: list[str], field: str, data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(records) - 1))
    before = records[i].get(field, _MISSING)
    after = data.draw(documents.filter(lambda v: before is _MISSING or differs(before, v)))
    changed = copy.deepcopy(records)
    changed[i][field] = after
    path = (*where, "records")
    name = field if PLAIN_NAME.fullmatch(field) else WILDCARD
    expected = "".join(f"/{n}" for n in path) + f"/*/{_escaped(name)}"
    found = seen(at(path, records), at(path, changed))
    if isinstance(before, list | dict) or isinstance(after, list | dict):
        # A change inside a container is seen at or below the field, never above it.
        assert found and all(o.pointer.startswith(expected) for o in found), found
    else:
        assert found == [ignore(expected)]


def _escaped(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


@PROFILE
@given(documents, documents)
def test_no_pattern_covers_a_whole_document_or_names_data(a: Any, b: Any) -> None:
    for found in (seen(a, b), seen(b, a), seen({"x": a}, {"x": b})):
        assert len(set(found)) == len(found)
        for o in found:
            segments = parse_pointer(o.pointer)
            assert segments and not covers_document(o.pointer)
            assert all(s == WILDCARD or PLAIN_NAME.fullmatch(s) for s in segments)
            assert o.rule == "ignore" or (o.key is not None and PLAIN_NAME.fullmatch(o.key))


# --- cases -----------------------------------------------------------------------------------


def records(n: int = 4, **extra: Any) -> list[dict[str, Any]]:
    return [{"id": i, "amount": i * 10, **extra} for i in range(n)]


@pytest.mark.parametrize(
    ("a", "b", "rules", "expected"),
    [
        pytest.param(
            {"records": records(), "served_at": "1"},
            {"records": records()[::-1], "served_at": "2"},
            PLAIN,
            [Observation("/records", "unordered", "id"), ignore("/served_at")],
            id="reorder and a clock",
        ),
        pytest.param(
            {"records": records(stamp="a")},
            {"records": [dict(r, stamp="b") for r in records()[::-1]]},
            PLAIN,
            [Observation("/records", "unordered", "id"), ignore("/records/*/stamp")],
            id="reorder and noise inside matched elements",
        ),
        pytest.param(
            {"records": [{"code": c, "n": 1} for c in "abc"]},
            {"records": [{"code": c, "n": 1} for c in "cab"]},
            PLAIN,
            [Observation("/records", "unordered", "code")],
            id="another plain key when there is no id",
        ),
        pytest.param(
            {"tags": ["a", "b", "c"]},
            {"tags": ["c", "a", "b"]},
            PLAIN,
            [],
            id="reorder with nothing naming the elements: no proposal",
        ),
        pytest.param(
            {"records": [{"v": 1}, {"v": 1}, {"v": 2}]},
            {"records": [{"v": 2}, {"v": 1}, {"v": 1}]},
            PLAIN,
            [],
            id="reorder with duplicate keys: no proposal",
        ),
        pytest.param(
            {"page": [{"id": 1}, {"id": 2}]},
            {"page": [{"id": 3}, {"id": 2}]},
            PLAIN,
            [ignore("/page/*")],
            id="another subset of elements",
        ),
        pytest.param(
            {"by_patient": {PLANTED: {"amount": 1}, "total": 3}},
            {"by_patient": {PLANTED: {"amount": 2}, "total": 3}},
            PLAIN,
            [ignore("/by_patient/*/amount")],
            id="a tokenized member name becomes a wildcard",
        ),
        pytest.param(
            {"a": [{"id": 1, "t": [{"k": 1}, {"k": 2}]}]},
            {"a": [{"id": 1, "t": [{"k": 2}, {"k": 1}]}]},
            PLAIN,
            [Observation("/a/*/t", "unordered", "k")],
            id="a nested reorder",
        ),
        pytest.param(
            {"records": records(served_at="1"), "served_at": "x"},
            {"records": [dict(r, served_at="2") for r in records()[::-1]], "served_at": "y"},
            compile_rules(
                CompareRules(ignore=("/served_at",), unordered={"/records": "id"}, headers=())
            ),
            [ignore("/records/*/served_at")],
            id="rules already applied are not observed again",
        ),
        pytest.param(
            {"at": "2024-03-01T12:00:00Z", "x": 1.0, "n": 1.0},
            {"at": "2024-03-01T13:00:00+01:00", "x": 1.05, "n": 1},
            compile_rules(CompareRules(numeric_tolerance=0.1)),
            [],
            id="instants and tolerance hold",
        ),
        pytest.param(
            {"records": records(5000, stamp="a"), "served_at": "1"},
            {"records": records(5000, stamp="b"), "served_at": "2"},
            PLAIN,
            [ignore("/records/*/stamp"), ignore("/served_at")],
            id="noise in every element of a long array, and beside it",
        ),
        pytest.param({"x": True}, {"x": 1}, PLAIN, [ignore("/x")], id="true is not 1"),
        pytest.param({"a": 1}, {"b": 1}, PLAIN, [ignore("/a"), ignore("/b")], id="members"),
        pytest.param([{"x": 1}], [{"x": 2}], PLAIN, [ignore("/*/x")], id="a root array's field"),
        pytest.param([1, 2], [1, 3], PLAIN, [], id="a root array's element: the whole document"),
        pytest.param({"x": 1}, [1], PLAIN, [], id="the root's type"),
    ],
)
def test_observations(a: Any, b: Any, rules: Rules, expected: list[Observation]) -> None:
    assert seen(a, b, rules) == expected


def test_bodies_that_are_not_json_give_nothing() -> None:
    assert observe(b"<html>1</html>", b"<html>2</html>", DEFAULT, never_called) == []
    assert observe(b'{"a": 1}', b"oops", DEFAULT, never_called) == []
    assert observe(b"", b"", DEFAULT, never_called) == []


def test_accepted_rules_merge_into_configured_ones() -> None:
    configured = CompareRules(ignore=("/served_at",), unordered={"/records": "id"})
    assert merge(configured, (), {}) is configured
    merged = merge(
        configured,
        ("/served_at", "/records/*/stamp", "/*", ""),
        {"/records": "code", "/tags": "k", "/*": "id"},
    )
    assert merged.ignore == ("/served_at", "/records/*/stamp")
    assert merged.unordered == {"/records": "id", "/tags": "k"}  # the configured key wins
    assert merged.headers == configured.headers
    noisy = (
        orjson.dumps({"records": [{"id": 1, "stamp": "a"}, {"id": 2, "stamp": "b"}]}),
        orjson.dumps({"records": [{"id": 2, "stamp": "c"}, {"id": 1, "stamp": "d"}]}),
    )
    before, after = compile_rules(CompareRules()), compile_rules(merged)
    first, second = (Answer(200, {}, body) for body in noisy)
    assert not compare(first, second, before, str).equal
    assert compare(first, second, after, str).equal


# --- the store -------------------------------------------------------------------------------


@pytest.fixture
async def noise(
    state_pool: asyncpg.Pool, redis_url: str, redis_prefix: str
) -> AsyncIterator[NoiseStore]:
    client = aioredis.Redis.from_url(redis_url)
    yield NoiseStore(state_pool, client, redis_prefix)
    await client.aclose()


async def snapshot(pool: asyncpg.Pool) -> tuple[Any, ...]:
    return (
        [dict(r) for r in await pool.fetch("SELECT * FROM bascule_noise ORDER BY 1, 2, 3, 4")],
        [dict(r) for r in await pool.fetch("SELECT * FROM bascule_audit ORDER BY id")],
        [dict(r) for r in await pool.fetch("SELECT * FROM bascule_noise_version ORDER BY 1")],
    )


async def pairs(store: NoiseStore, n: int, *obs: Observation, route: str = ROUTE) -> None:
    for _ in range(n):
        await store.record("dcir", route, obs)


CLOCK = ignore("/served_at")
ORDER = Observation("/records", "unordered", "id")


async def test_a_proposal_appears_only_after_its_pairs(noise: NoiseStore) -> None:
    await noise.record("dcir", ROUTE, [CLOCK, CLOCK, ORDER])  # one pair: counted once
    await noise.record("dcir", ROUTE, [CLOCK])
    assert await noise.proposals("dcir", 3) == []
    await noise.record("dcir", ROUTE, [CLOCK, Observation("/", "ignore"), ignore("/*")])
    listed = await noise.proposals("dcir", 3)
    assert [(p["pointer"], p["rule"], p["pairs"], p["status"]) for p in listed] == [
        ("/served_at", "ignore", 3, "pending")
    ]
    assert listed[0]["first_seen"] <= listed[0]["last_seen"]
    assert [p["pointer"] for p in await noise.proposals("dcir", 1)] == ["/served_at", "/records"]
    rows = await noise.pool.fetch("SELECT pointer FROM bascule_noise")
    assert {r["pointer"] for r in rows} == {"/served_at", "/records"}  # never a whole document
    assert await noise.proposals("pmsi", 1) == []
    with pytest.raises(UnknownDataset, match=r"'nope'.*dcir"):
        await noise.proposals("nope", 3)


async def test_accept_is_audited_announced_and_shared(noise: NoiseStore) -> None:
    await pairs(noise, 3, CLOCK, ORDER)
    await pairs(noise, 3, CLOCK, route=QUERY)
    version = await noise.version()
    async with noise.redis.pubsub() as pubsub:
        await pubsub.subscribe(channel(noise.prefix))
        done = await noise.decide(
            "dcir", "/served_at", True, "a clock", "alice", min_pairs=3, details={"via": "test"}
        )
        message = None
        while message is None:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
    assert orjson.loads(message["data"]) == {"dataset": "dcir", "version": done["version"]}
    assert done["announced"] and done["decision"] == "accepted"
    assert sorted(r["route"] for r in done["rules"]) == [QUERY, ROUTE]
    await noise.decide("dcir", "/records", True, "paged by id", "bob", ROUTE, min_pairs=3)
    assert await noise.accepted("dcir") == {
        QUERY: (("/served_at",), {}),
        ROUTE: (("/served_at",), {"/records": "id"}),
    }
    assert await noise.accepted("pmsi") == {}
    assert await noise.version() == version + 2 == await noise.version("dcir")
    audit = await StageStore(noise.pool).history("dcir")
    assert [(a.action, a.actor, a.reason) for a in audit[-2:]] == [
        ("noise-accept", "alice", "a clock"),
        ("noise-accept", "bob", "paged by id"),
    ]
    assert audit[-2].details["pointer"] == "/served_at"
    assert audit[-2].details["via"] == "test"
    listed = await noise.proposals("dcir", 3)
    assert {(p["pointer"], p["route"], p["status"], p["decided_by"]) for p in listed} == {
        ("/served_at", ROUTE, "accepted", "alice"),
        ("/served_at", QUERY, "accepted", "alice"),
        ("/records", ROUTE, "accepted", "bob"),
    }


async def test_reject_is_audited_and_undoes_an_accept(noise: NoiseStore) -> None:
    await pairs(noise, 3, CLOCK)
    await noise.decide("dcir", "/served_at", True, "a clock", "alice", min_pairs=3)
    await noise.decide("dcir", "/served_at", False, "it was a real bug", "bob", min_pairs=3)
    assert await noise.accepted("dcir") == {}
    (row,) = await noise.proposals("dcir", 3)
    assert (row["status"], row["decided_by"], row["reason"]) == (
        "rejected",
        "bob",
        "it was a real bug",
    )
    audit = await StageStore(noise.pool).history("dcir")
    assert [(a.action, a.details["rules"][0]["was"]) for a in audit[-2:]] == [
        ("noise-accept", None),
        ("noise-reject", "accepted"),
    ]
    await pairs(noise, 1, CLOCK)  # still counted, still rejected
    assert (await noise.proposals("dcir", 3))[0]["pairs"] == 4


@pytest.mark.parametrize(
    ("dataset", "pointer", "reason", "route", "error", "needle"),
    [
        ("nope", "/served_at", "r", None, UnknownDataset, "unknown dataset 'nope'"),
        ("Bad Name", "/served_at", "r", None, UsageError, "a dataset name is"),
        ("dcir", "/nothing", "r", None, UnknownProposal, "no noise proposal at '/nothing'"),
        ("dcir", "/served_at", "r", QUERY, UnknownProposal, "on route"),
        ("dcir", "/served_at", None, None, UsageError, "a reason is required"),
        ("dcir", "/served_at", "  ", None, UsageError, "a reason is required"),
        ("dcir", "served_at", "r", None, UsageError, "not a JSON pointer"),
        ("dcir", "/rare", "r", None, Refused, "seen differing in 2 independent pairs"),
        ("dcir", "/done", "r", None, Refused, "already accepted"),
        ("dcir", "/records", "r", None, Refused, "matched by code and id"),
    ],
)
async def test_refusals_change_nothing(
    noise: NoiseStore,
    dataset: str,
    pointer: str,
    reason: str | None,
    route: str | None,
    error: type[Exception],
    needle: str,
) -> None:
    await pairs(noise, 3, CLOCK, ignore("/done"), ORDER)
    await pairs(noise, 2, ignore("/rare"))
    await noise.decide("dcir", "/done", True, "r", "alice", min_pairs=3)
    await noise.decide("dcir", "/records", True, "by id", "alice", min_pairs=3)
    # Later pairs matched the same array by another key: accepting it too is refused.
    await pairs(noise, 3, Observation("/records", "unordered", "code"))
    before = await snapshot(noise.pool)
    with pytest.raises(error, match=re.escape(needle)):
        await noise.decide(dataset, pointer, True, reason, "alice", route, min_pairs=3)
    assert await snapshot(noise.pool) == before


async def test_with_redis_away_decisions_and_rules_still_go_through_postgres(
    state_pool: asyncpg.Pool, redis_prefix: str
) -> None:
    away = aioredis.Redis.from_url(
        closed_port_url().replace("http", "redis"), socket_connect_timeout=0.5
    )
    store = NoiseStore(state_pool, away, redis_prefix)
    try:
        await pairs(store, 3, CLOCK)
        version = await store.version()
        done = await store.decide("dcir", "/served_at", True, "a clock", "alice", min_pairs=3)
        assert not done["announced"]
        assert await store.version() != version  # what replicas poll
        assert await store.accepted("dcir") == {ROUTE: (("/served_at",), {})}
    finally:
        await away.aclose()


async def test_replicas_hear_decisions_on_redis(noise: NoiseStore) -> None:
    await pairs(noise, 3, CLOCK)
    heard: asyncio.Queue[str | None] = asyncio.Queue()

    async def on_change(dataset: str | None) -> None:
        await heard.put(dataset)

    task = spawn(noise.listen(on_change), name="noise-listen-test")
    try:
        async with asyncio.timeout(5.0):
            assert await heard.get() is None  # subscribed: reload once
        await noise.decide("dcir", "/served_at", True, "a clock", "alice", min_pairs=3)
        async with asyncio.timeout(5.0):
            assert await heard.get() == "dcir"
    finally:
        while not task.done():  # redis-py may swallow a cancellation: insist
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- the CLI and the admin API ---------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    return cli_env(tmp_path, pg_url, redis_url, redis_prefix)


async def test_cli_lists_accepts_and_rejects(noise: NoiseStore, env: dict[str, str]) -> None:
    await pairs(noise, 3, CLOCK, ORDER)
    await pairs(noise, 2, ignore("/rare"))
    done = run_cli(env, "noise", "dcir", "--json")
    assert done.returncode == 0, done.stderr
    listed = orjson.loads(done.stdout)
    assert listed["min_pairs"] == 3
    assert [(p["pointer"], p["pairs"]) for p in listed["proposals"]] == [
        ("/records", 3),
        ("/served_at", 3),
    ]
    table = run_cli(env, "noise", "dcir")
    assert "/served_at" in table.stdout and "unordered by id" in table.stdout
    assert "/rare" not in table.stdout
    done = run_cli(
        env, "noise", "dcir", "accept", "/served_at", "--reason", "a clock", "--by", "alice"
    )
    assert done.returncode == 0, done.stderr
    assert "/served_at accepted (ignore on /v1/datasets/{dataset}/records); audited" in done.stdout
    assert await noise.accepted("dcir") == {ROUTE: (("/served_at",), {})}
    done = run_cli(env, "noise", "dcir", "reject", "/records", "--reason", "a bug", "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["decision"] == "rejected"
    history = run_cli(env, "history", "dcir")
    assert "noise-accept /served_at" in history.stdout and "a clock" in history.stdout
    assert "noise-reject /records" in history.stdout


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("noise", "nope"), 3, "unknown dataset 'nope'"),
        (("noise", "nope", "accept", "/served_at", "--reason", "r"), 3, "unknown dataset 'nope'"),
        (("noise", "dcir", "accept", "/served_at"), 2, "a reason is required"),
        (("noise", "dcir", "accept", "--reason", "r"), 2, "name the pointer to accept"),
        (("noise", "dcir", "accept", "/nothing", "--reason", "r"), 3, "no noise proposal"),
        (("noise", "dcir", "reject", "/rare", "--reason", "r"), 3, "becomes a proposal at 3"),
        (("noise", "dcir", "ignore", "/served_at"), 2, "invalid choice"),
        (("noise", "dcir", "--reason", "r"), 2, "--reason goes with accept or reject"),
    ],
)
async def test_cli_refusals_have_their_exit_code_and_change_nothing(
    noise: NoiseStore, env: dict[str, str], args: tuple[str, ...], code: int, needle: str
) -> None:
    await pairs(noise, 3, CLOCK)
    await pairs(noise, 2, ignore("/rare"))
    before = await snapshot(noise.pool)
    done = run_cli(env, *args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert needle in done.stderr
    assert await snapshot(noise.pool) == before


@pytest.fixture
async def admin(noise: NoiseStore) -> AsyncIterator[str]:
    deps = AdminDeps(
        Operations(
            StageStore(noise.pool),
            RedisAnnouncer(noise.redis, noise.prefix),
            noise_store=noise,
            noise_pairs={"dcir": 3, "pmsi": 5},
        ),
        None,
        {"operator": OPERATOR_TOKEN},
        VIEWER_TOKEN,
    )
    async with serve_app(create_admin_app(deps)) as url:
        yield url


async def test_admin_lists_with_a_viewer_token_and_decides_with_the_operator_one(
    noise: NoiseStore, admin: str
) -> None:
    await pairs(noise, 3, CLOCK)
    status, body = await call("GET", admin + "/v1/datasets/dcir/noise", VIEW)
    assert status == 200 and body["min_pairs"] == 3
    assert [p["pointer"] for p in body["proposals"]] == ["/served_at"]
    assert (await call("GET", admin + "/v1/datasets/dcir/noise"))[0] == 401
    status, body = await call("GET", admin + "/v1/datasets/nope/noise", VIEW)
    assert status == 404 and "nope" in body["error"]["message"]
    decision = {"pointer": "/served_at", "decision": "accept", "reason": "a clock", "by": "carol"}
    status, body = await call("POST", admin + "/v1/datasets/dcir/noise", OP, decision)
    assert (status, body["decision"]) == (200, "accepted"), body
    assert await noise.accepted("dcir") == {ROUTE: (("/served_at",), {})}
    last = (await StageStore(noise.pool).history("dcir"))[-1]
    assert (last.action, last.actor, last.details["on_behalf_of"]) == (
        "noise-accept",
        "operator",
        "carol",
    )


@pytest.mark.parametrize(
    ("headers", "dataset", "body", "status", "needle"),
    [
        (VIEW, "dcir", {"pointer": "/served_at", "decision": "accept", "reason": "r"}, 403, "op"),
        (OP, "nope", {"pointer": "/served_at", "decision": "accept", "reason": "r"}, 404, "nope"),
        (OP, "dcir", {"decision": "accept", "reason": "r"}, 400, "'pointer' is required"),
        (OP, "dcir", {"pointer": 3, "decision": "accept", "reason": "r"}, 400, "'pointer' must"),
        (OP, "dcir", {"pointer": "/served_at", "decision": "ok", "reason": "r"}, 400, "'decision'"),
        (OP, "dcir", {"pointer": "/served_at", "decision": "accept"}, 400, "a reason is required"),
        (
            OP,
            "dcir",
            {"pointer": "/served_at", "decision": "accept", "reason": "r", "force": True},
            400,
            "unknown field(s) 'force'",
        ),
        (
            OP,
            "dcir",
            {"pointer": "/nothing", "decision": "reject", "reason": "r"},
            404,
            "no noise proposal",
        ),
        (
            OP,
            "dcir",
            {"pointer": "/rare", "decision": "accept", "reason": "r"},
            409,
            "becomes a proposal at 3",
        ),
        (
            OP,
            "pmsi",
            {"pointer": "/served_at", "decision": "accept", "reason": "r"},
            409,
            "becomes a proposal at 5",
        ),
    ],
)
async def test_admin_refusals_change_nothing(
    noise: NoiseStore,
    admin: str,
    headers: dict[str, str],
    dataset: str,
    body: object,
    status: int,
    needle: str,
) -> None:
    await pairs(noise, 3, CLOCK)
    await pairs(noise, 2, ignore("/rare"))
    for _ in range(4):  # pmsi proposes at 5 pairs
        await noise.record("pmsi", ROUTE, [CLOCK])
    before = await snapshot(noise.pool)
    got, payload = await call("POST", admin + f"/v1/datasets/{dataset}/noise", headers, body)
    assert got == status, payload
    assert needle in payload["error"]["message"]
    assert await snapshot(noise.pool) == before


async def test_admin_without_noise_store_says_so(noise: NoiseStore) -> None:
    deps = AdminDeps(
        Operations(
            StageStore(noise.pool),
            RedisAnnouncer(noise.redis, noise.prefix),
        ),
        None,
        {"operator": OPERATOR_TOKEN},
        VIEWER_TOKEN,
    )
    async with serve_app(create_admin_app(deps)) as url:
        status, body = await call("GET", url + "/v1/datasets/dcir/noise", VIEW)
    assert status == 503 and "noise proposals are not available" in body["error"]["message"]


async def test_cli_through_the_admin_api(noise: NoiseStore, admin: str) -> None:
    await pairs(noise, 3, CLOCK)
    env = {**os.environ, "BASCULE_ADMIN_URL": admin, "BASCULE_ADMIN_TOKEN": OPERATOR_TOKEN}
    done = await arun(env, "noise", "dcir", "--json")
    assert done.returncode == 0, done.stderr
    assert [p["pointer"] for p in orjson.loads(done.stdout)["proposals"]] == ["/served_at"]
    done = await arun(env, "noise", "dcir", "accept", "/nothing", "--reason", "r")
    assert done.returncode == 3 and "no noise proposal" in done.stderr
    done = await arun(env, "noise", "dcir", "accept", "/served_at", "--reason", "a clock")
    assert done.returncode == 0, done.stderr
    assert await noise.accepted("dcir") == {ROUTE: (("/served_at",), {})}
    done = await arun(env, "noise", "dcir", "accept", "/served_at", "--reason", "again")
    assert done.returncode == 3 and "already accepted" in done.stderr
