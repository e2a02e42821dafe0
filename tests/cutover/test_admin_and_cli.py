"""The admin API and the SRE CLI: tokens, bad input, exit codes — and that refusals change
nothing, checked against the stage table and the audit trail each time."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from rich.console import Console

from bascule.app import render
from bascule.app.admin import AdminDeps, create_admin_app
from bascule.app.operations import Operations
from bascule.procs import bascule_argv
from bascule.state.fleet import RedisAnnouncer
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageStore
from refapi.lab import OPERATOR_TOKEN, VIEWER_TOKEN, migrate_state
from tests.harness import cli_env as harness_cli_env
from tests.harness import offline_config, run_cli, serve_app

OP = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
ALICE_TOKEN = "alice-token-0123456789abcdef"
VIEW = {"Authorization": f"Bearer {VIEWER_TOKEN}"}


class Admin:
    def __init__(self, url: str, store: StageStore) -> None:
        self.url = url
        self.store = store

    async def snapshot(self) -> tuple[object, object]:
        return await self.store.all(), await self.store.history()


@pytest.fixture
async def admin(pg_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[Admin]:
    await migrate_state(pg_url)
    pool = await open_pool(pg_url)
    redis = aioredis.Redis.from_url(redis_url)
    store = StageStore(pool)
    deps = AdminDeps(
        Operations(
            store,
            RedisAnnouncer(redis, redis_prefix),
        ),
        None,
        {"operator": OPERATOR_TOKEN, "alice": ALICE_TOKEN},
        VIEWER_TOKEN,
    )
    async with serve_app(create_admin_app(deps)) as url:
        yield Admin(url, store)
    await redis.aclose()
    await pool.close()


async def call(
    method: str, url: str, headers: dict[str, str] | None = None, body: object = None
) -> tuple[int, dict]:  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as session:
        data = orjson.dumps(body) if body is not None else None
        async with session.request(method, url, headers=headers or {}, data=data) as resp:
            return resp.status, orjson.loads(await resp.read())


async def test_journal_listing_refuses_an_unknown_state(admin: Admin) -> None:
    status, body = await call("GET", admin.url + "/v1/journal/entries?state=lost", VIEW)
    assert status == 400 and "state must be one of" in body["error"]["message"]
    status, body = await call("GET", admin.url + "/v1/journal", VIEW)
    assert status == 200 and {r["dataset"] for r in body["journal"]} >= {"dcir", "pmsi"}


async def test_divergence_is_read_with_a_viewer_token_and_checks_its_input(
    admin: Admin,
) -> None:
    status, body = await call("GET", admin.url + "/v1/datasets/dcir/divergence", VIEW)
    assert (status, body["divergence"]) == (200, [])
    status, body = await call("GET", admin.url + "/v1/datasets/nope/divergence", VIEW)
    assert status == 404 and "nope" in body["error"]["message"]
    status, body = await call("GET", admin.url + "/v1/datasets/dcir/divergence?since=-1", VIEW)
    assert status == 400 and "more than 0" in body["error"]["message"]
    for bad in ("inf", "nan", "1e12"):
        url = admin.url + f"/v1/datasets/dcir/divergence?since={bad}"
        status, body = await call("GET", url, VIEW)
        assert status == 400 and "since must be a number of seconds" in body["error"]["message"]
    assert (await call("GET", admin.url + "/v1/datasets/dcir/divergence"))[0] == 401


async def test_health_is_open_and_reads_need_a_token(admin: Admin) -> None:
    assert (await call("GET", admin.url + "/healthz"))[0] == 200
    status, body = await call("GET", admin.url + "/v1/datasets")
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, body = await call("GET", admin.url + "/v1/datasets", {"Authorization": "Bearer nope"})
    assert status == 401
    for headers in (VIEW, OP):
        status, body = await call("GET", admin.url + "/v1/datasets", headers)
        assert status == 200
        assert [d["dataset"] for d in body["datasets"]] == ["cepidc", "dcir", "default", "pmsi"]


@pytest.mark.parametrize(
    ("headers", "path", "body", "status", "needle"),
    [
        ({}, "/v1/datasets/dcir/stage", {"stage": "dualwrite", "reason": "r"}, 401, "Bearer"),
        (
            {"Authorization": "Bearer wrong-token-xxxxxxx"},
            "/v1/datasets/dcir/stage",
            {"stage": "dualwrite", "reason": "r"},
            401,
            "Bearer",
        ),
        (
            VIEW,
            "/v1/datasets/dcir/stage",
            {"stage": "dualwrite", "reason": "r"},
            403,
            "operator token",
        ),
        (
            OP,
            "/v1/datasets/nope/stage",
            {"stage": "dualwrite", "reason": "r"},
            404,
            "unknown dataset 'nope'",
        ),
        (
            OP,
            "/v1/datasets/dcir/stage",
            {"stage": "golive", "reason": "r"},
            400,
            "unknown stage 'golive'",
        ),
        (
            OP,
            "/v1/datasets/dcir/stage",
            {"stage": "live", "reason": "r"},
            409,
            "one stage at a time (skips dualwrite, shadow)",
        ),
        (OP, "/v1/datasets/dcir/stage", {"stage": "dualwrite"}, 400, "a reason is required"),
        (OP, "/v1/datasets/dcir/stage", {"reason": "r"}, 400, "'stage' is required"),
        (OP, "/v1/datasets/dcir/stage", [1, 2], 400, "JSON object"),
        (OP, "/v1/datasets/dcir/rollback", {"reason": "r"}, 409, "already at the first stage"),
        (OP, "/v1/datasets/dcir/stage", {"stage": 3, "reason": "r"}, 400, "must be a string"),
        (VIEW, "/v1/journal/retry", {"all_dead": True}, 403, "operator token"),
        (OP, "/v1/journal/retry", {}, 400, "name one entry"),
        (OP, "/v1/journal/retry", {"seq": "7"}, 400, "'seq' must be a whole number"),
        (OP, "/v1/journal/retry", {"seq": 7}, 409, "journal entry 7 does not exist"),
        (VIEW, "/v1/journal/7/skip", {"reason": "r"}, 403, "operator token"),
        (OP, "/v1/journal/7/skip", {}, 400, "a reason is required"),
        (OP, "/v1/journal/seven/skip", {"reason": "r"}, 400, "whole number"),
        (OP, "/v1/journal/7/skip", {"reason": "r"}, 409, "journal entry 7 does not exist"),
        (OP, "/v1/datasets/dcir/stage", {"stage": "dualwrite", "dry_run": "yes"}, 400, "true or"),
        (OP, "/v1/datasets/dcir/rollback", {"reason": "r", "dry-run": True}, 400, "unknown field"),
        (VIEW, "/v1/datasets/dcir/gaps/target/close", {"reason": "r"}, 403, "operator token"),
        (OP, "/v1/datasets/dcir/gaps/target/close", {"reason": "r"}, 409, "cannot be closed in"),
    ],
)
async def test_bad_changes_are_refused_and_change_nothing(
    admin: Admin, headers: dict[str, str], path: str, body: object, status: int, needle: str
) -> None:
    before = await admin.snapshot()
    got, payload = await call("POST", admin.url + path, headers, body)
    assert got == status
    assert needle in payload["error"]["message"]
    assert await admin.snapshot() == before


async def test_oversized_and_malformed_bodies(admin: Admin) -> None:
    before = await admin.snapshot()
    async with aiohttp.ClientSession() as session:
        async with session.post(
            admin.url + "/v1/datasets/dcir/stage", headers=OP, data=b"{" * 100_000
        ) as resp:
            assert resp.status == 413
        async with session.post(
            admin.url + "/v1/datasets/dcir/stage", headers=OP, data=b"{not json"
        ) as resp:
            assert resp.status == 400
            assert "not valid JSON" in (await resp.json())["error"]["message"]
    assert await admin.snapshot() == before


async def test_operator_moves_and_rolls_back_and_the_token_names_who(admin: Admin) -> None:
    alice = {"Authorization": f"Bearer {ALICE_TOKEN}"}
    status, body = await call(
        "POST", admin.url + "/v1/datasets/dcir/stage", alice, {"stage": "dualwrite", "reason": "go"}
    )
    assert (status, body["from"], body["to"], body["version"]) == (200, "source", "dualwrite", 2)
    status, body = await call(
        "POST", admin.url + "/v1/datasets/dcir/rollback", OP, {"reason": "undo", "by": "the-ciso"}
    )
    assert (status, body["to"]) == (200, "source")
    status, body = await call("GET", admin.url + "/v1/history?dataset=dcir", VIEW)
    rows = [(h["action"], h["actor"], h["details"].get("on_behalf_of")) for h in body["history"]]
    # The audit's "who" is the token's name; a name the caller typed is kept apart, as such.
    assert rows == [
        ("register", "test", None),
        ("stage", "alice", None),
        ("rollback", "operator", "the-ciso"),
    ]


# --- the CLI, as an SRE runs it --------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    return harness_cli_env(tmp_path, pg_url, redis_url, redis_prefix)


run = run_cli


def test_cli_migrate_status_stage_history(cli_env: dict[str, str]) -> None:
    done = run(cli_env, "status")
    assert done.returncode == 1 and "run `bascule migrate" in done.stderr
    done = run(cli_env, "migrate", "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["registered"] == ["cepidc", "dcir", "default", "pmsi"]
    done = run(cli_env, "stage", "dcir", "dualwrite", "--reason", "start", "--by", "alice")
    assert done.returncode == 0, done.stderr
    assert "dcir: source -> dualwrite (version 2)" in done.stdout
    status = orjson.loads(run(cli_env, "status", "--json").stdout)
    assert {d["dataset"]: d["stage"] for d in status["datasets"]} == {
        "cepidc": "source",
        "dcir": "dualwrite",
        "default": "source",
        "pmsi": "source",
    }
    table = run(cli_env, "status", "dcir").stdout
    assert "dualwrite" in table and "alice" in table and "pmsi" not in table
    history = orjson.loads(run(cli_env, "history", "dcir", "--json").stdout)["history"]
    assert [(h["action"], h["to_stage"], h["actor"]) for h in history][-1] == (
        "stage",
        "dualwrite",
        "alice",
    )


REFUSALS: list[tuple[tuple[str, ...], int, str]] = [
    (("stage", "nope", "dualwrite", "--reason", "r"), 3, "unknown dataset 'nope'"),
    (("stage", "dcir", "golive", "--reason", "r"), 3, "unknown stage 'golive'"),
    (("stage", "dcir", "shadow", "--reason", "r"), 3, "one stage at a time (skips dualwrite)"),
    (("stage", "dcir", "dualwrite"), 2, "a reason is required"),
    (("rollback", "dcir", "--reason", "r"), 3, "already at the first stage"),
    (("status", "nope"), 3, "unknown dataset 'nope'"),
    (("history", "--limit", "0"), 2, "--limit must be at least 1"),
    (("gap", "close", "dcir", "target", "--reason", "r"), 3, "writes do not reach the target"),
]


def test_cli_refusals_have_their_exit_code_and_change_nothing(cli_env: dict[str, str]) -> None:
    """Each refusal in turn on one migrated store (a CLI process costs a second on a loaded
    2-core machine: one store for all of them, not one each), then the history unchanged."""
    assert run(cli_env, "migrate").returncode == 0
    before = run(cli_env, "history", "--json").stdout
    for args, code, needle in REFUSALS:
        done = run(cli_env, *args)
        assert done.returncode == code, (args, done.stdout, done.stderr)
        assert needle in done.stderr, (args, done.stderr)
    assert run(cli_env, "history", "--json").stdout == before


def test_cli_without_config_says_what_to_pass() -> None:
    env = {k: v for k, v in os.environ.items() if k != "BASCULE_CONFIG"}
    done = run(env, "status")
    assert done.returncode == 2 and "pass --config FILE or set BASCULE_CONFIG" in done.stderr


async def arun(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``run`` without blocking the loop that serves the admin API in this test."""
    proc = await asyncio.create_subprocess_exec(
        *bascule_argv(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def test_cli_through_the_admin_api(admin: Admin) -> None:
    env = {**os.environ, "BASCULE_ADMIN_URL": admin.url, "BASCULE_ADMIN_TOKEN": OPERATOR_TOKEN}
    done = await arun(env, "stage", "dcir", "dualwrite", "--reason", "via api", "--by", "carol")
    assert done.returncode == 0, done.stderr
    assert (await admin.store.get("dcir")).updated_by == "operator"  # the token's name
    assert (await admin.store.history("dcir"))[-1].details["on_behalf_of"] == "carol"
    done = await arun(env, "stage", "dcir", "live", "--reason", "skip")
    assert done.returncode == 3 and "one stage at a time" in done.stderr
    done = await arun(
        {**env, "BASCULE_ADMIN_TOKEN": "bad-token-0123456789"},
        "stage",
        "pmsi",
        "dualwrite",
        "--reason",
        "r",
    )
    assert done.returncode == 2 and "valid Bearer token" in done.stderr
    status = orjson.loads((await arun(env, "status", "--json")).stdout)
    assert {d["dataset"]: d["stage"] for d in status["datasets"]}["dcir"] == "dualwrite"


# --- operator input the admin API must refuse cleanly (issue 16, item 6) ---------------------

HUGE = "9" * 5000
"""A number of 5,000 digits: past what ``int()`` parses, and past any seq."""


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/journal/²/skip", {"reason": "r"}, "whole number"),  # str.isdigit() says yes
        ("/v1/journal/٣/skip", {"reason": "r"}, "whole number"),  # int() reads it as 3
        (f"/v1/journal/{HUGE}/skip", {"reason": "r"}, "whole number"),
        (f"/v1/journal/{2**63}/skip", {"reason": "r"}, "at most 9223372036854775807"),
        ("/v1/journal/0/skip", {"reason": "r"}, "whole number"),
        ("/v1/journal/retry", {"seq": 2**63}, "at most 9223372036854775807"),
        ("/v1/journal/retry", {"seq": -1}, "whole number"),
    ],
)
async def test_bad_journal_entries_are_a_clear_400(
    admin: Admin, path: str, body: object, needle: str
) -> None:
    before = await admin.snapshot()
    status, payload = await call("POST", admin.url + path, OP, body)
    assert (status, payload["error"]["code"]) == (400, "bad_request"), payload
    assert needle in payload["error"]["message"]
    assert await admin.snapshot() == before


@pytest.mark.parametrize(
    "query", ["since=inf", "since=1e12", "since=nan", f"since={HUGE}", "since=-0", "limit=²"]
)
async def test_bad_read_parameters_are_a_clear_400(admin: Admin, query: str) -> None:
    path = "/v1/history?" if query.startswith("limit") else "/v1/datasets/dcir/divergence?"
    status, payload = await call("GET", admin.url + path + query, VIEW)
    assert (status, payload["error"]["code"]) == (400, "bad_request"), payload
    assert "since" in payload["error"]["message"] or "limit" in payload["error"]["message"]


async def test_the_cli_sends_since_encoded_through_the_admin_api(admin: Admin) -> None:
    # 1000000 is formatted `1e+06`: a `+` left raw in a query string reads as a space.
    env = {**os.environ, "BASCULE_ADMIN_URL": admin.url, "BASCULE_VIEWER_TOKEN": VIEWER_TOKEN}
    done = await arun(env, "divergence", "dcir", "--since", "1000000", "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["dataset"] == "dcir"


def test_a_token_that_cannot_be_sent_is_refused_at_start(tmp_path: Path) -> None:
    # Accepted at start, it made every admin request fail (500) once compared.
    config = tmp_path / "bascule.toml"
    offline_config(config)
    for variable, value in (
        ("BASCULE_OPERATOR_TOKENS", "alice=t\u00f6ken\u2169-0123456789abcdef"),
        ("BASCULE_ADMIN_TOKEN", "\u2169-0123456789abcdef"),
        ("BASCULE_VIEWER_TOKEN", "viewer token with spaces"),
    ):
        env = {**os.environ, variable: value}
        done = run(env, "proxy", "--config", str(config))
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert f"environment: {variable}" in done.stderr and "printable ASCII" in done.stderr
        assert "Traceback" not in done.stderr


# --- what the audit trail may hold (issue 16, item 12) ---------------------------------------


@pytest.mark.parametrize(
    "reason",
    [
        "planned\n2026-01-01 00:00:00Z  dcir  stage  live  target  ciso  approved",
        "planned\roverwritten",
        "next line\u2028here",  # LINE SEPARATOR
        "\u202eevil",  # RIGHT-TO-LEFT OVERRIDE: the rest of the line reads backwards
        "a \u2066isolate\u2069",
        "a C1 control \x85 (NEL)",
        "a tab\there",
    ],
)
async def test_a_reason_that_could_draw_fake_lines_is_refused(admin: Admin, reason: str) -> None:
    before = await admin.snapshot()
    for path, body in (
        ("/v1/datasets/dcir/stage", {"stage": "dualwrite", "reason": reason}),
        ("/v1/datasets/dcir/stage", {"stage": "dualwrite", "reason": "ok", "by": reason}),
        ("/v1/datasets/dcir/auto-promote", {"on": True, "reason": reason}),
    ):
        status, payload = await call("POST", admin.url + path, OP, body)
        assert (status, payload["error"]["code"]) == (400, "bad_request"), (reason, payload)
        assert "not allowed" in payload["error"]["message"]
    assert await admin.snapshot() == before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/datasets/dcir%0A/stage"),
        ("GET", "/v1/datasets/dcir%0A/gate"),
        ("GET", "/v1/datasets/dcir%0A/divergence"),
        ("GET", "/v1/history?dataset=dcir%0A"),
    ],
)
async def test_a_dataset_name_with_a_trailing_newline_is_a_bad_name(
    admin: Admin, method: str, path: str
) -> None:
    # `$` in a regex matches before a trailing newline: `dcir\n` passed the name check (404).
    before = await admin.snapshot()
    body = {"stage": "dualwrite", "reason": "r"} if method == "POST" else None
    status, payload = await call(method, admin.url + path, OP, body)
    assert (status, payload["error"]["code"]) == (400, "bad_request"), payload
    assert "a dataset name is" in payload["error"]["message"]
    assert await admin.snapshot() == before


def test_a_reason_with_a_line_break_is_refused_by_the_cli(cli_env: dict[str, str]) -> None:
    assert run(cli_env, "migrate").returncode == 0
    before = run(cli_env, "history", "--json").stdout
    done = run(cli_env, "stage", "dcir", "dualwrite", "--reason", "ok\nfake", "--by", "sre")
    assert done.returncode == 2 and "not allowed" in done.stderr
    assert run(cli_env, "history", "--json").stdout == before


def test_a_reason_stored_before_it_was_refused_is_shown_on_one_line() -> None:
    out = Console(width=120, record=True)
    out.print(render.table("history", ("by", "reason"), [("sre", "ok\nfake row \u202eevil")]))
    text = out.export_text()
    assert "ok\\nfake row \\u202eevil" in text and "\u202e" not in text


_ADMIN_PIECES = [
    "v1", "datasets", "dcir", "pmsi", "nope", "dcir\n", "divergence", "gate", "stage",
    "rollback", "gaps", "target", "source", "close", "noise", "auto-promote", "history",
    "journal", "entries", "retry", "skip", "replicas", "\u00b2", "\u0663", "7", "9" * 5000,
    str(2**63), "%2F", "%zz", "..", "", "%00",
]  # fmt: skip
_QUERIES = ["", "?since=inf", "?since=nan", "?since=1e12", "?since=1e+06", "?since=-1",
            "?since=", "?limit=99999999999999999999", "?state=lost", "?a=1&a=2"]  # fmt: skip
_ADMIN_BODIES = [b"", b"{}", b"{", b"null", b'{"stage": "live", "reason": "x"}',
                 b'{"reason": "a\\nb"}', b"\xff\xfe", b'{"to": "source", "by": "x"}']  # fmt: skip


async def test_random_admin_requests_get_no_500_and_change_nothing_without_an_operator_token(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    """Random and malformed admin requests, with no token, a wrong one or the viewer's: never a
    500, never a log line at ERROR (a request aiohttp cannot parse is one WARNING line), the
    stage table and the audit trail unchanged, and the API still answers after each."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    caplog.set_level(logging.WARNING)
    loop = asyncio.get_running_loop()
    before = await admin.snapshot()
    port = int(admin.url.rsplit(":", 1)[1])

    async def one(method: str, path: str, query: str, token: str | None, body: bytes) -> None:
        auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
        head = (
            f"{method} {path}{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head.encode("utf-8", "surrogateescape") + body)
            await writer.drain()
            async with asyncio.timeout(30):
                line = await reader.readline()
        finally:
            writer.close()
        status = line.split(b" ", 2)[1] if line.startswith(b"HTTP/") else b"closed"
        assert status != b"500", (method, path[:80], query, token, body)
        assert await admin.snapshot() == before, (method, path[:80], query, token, body)
        assert (await call("GET", admin.url + "/v1/datasets", VIEW))[0] == 200

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "M-SEARCH", "get", "FOO"]),
        path=st.lists(st.sampled_from(_ADMIN_PIECES), max_size=6).map(lambda p: "/" + "/".join(p)),
        query=st.sampled_from(_QUERIES),
        token=st.sampled_from([None, VIEWER_TOKEN, "wrong", "\u00e9t\u00e9"]),
        body=st.sampled_from(_ADMIN_BODIES),
    )
    def check(method: str, path: str, query: str, token: str | None, body: bytes) -> None:
        asyncio.run_coroutine_threadsafe(one(method, path, query, token, body), loop).result(60)

    await loop.run_in_executor(None, check)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [(r.name, r.getMessage()[:200]) for r in errors]
