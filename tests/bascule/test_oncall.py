"""The on-call page on the admin port: a real proxy in `shadow`, a divergence planted in the
target's database behind bascule's back and read through the proxy, then the page as a person
sees it (headless Chromium, logged in with the viewer token) and as a script reads it (its
HTML and its JSON), where no record value may ever appear."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from yarl import URL

from bascule.app import oncall
from bascule.app.admin import AdminDeps, create_admin_app
from bascule.app.oncall import SESSION_COOKIE
from bascule.app.operations import Operations
from bascule.state.fleet import RedisAnnouncer
from bascule.state.postgres import open_pool
from bascule.state.stage_store import StageStore
from refapi.lab import AUTH, OPERATOR_TOKEN, VIEWER_TOKEN, migrate_state
from tests.browser import browser, chromium
from tests.conftest import Ground
from tests.harness import serve_app
from tests.world import PLANTED, World, get, shadow_world

VIEW = {"Authorization": f"Bearer {VIEWER_TOKEN}"}


@pytest.fixture(autouse=True)
def viewer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The world's in-process replicas read their tokens from the environment."""
    monkeypatch.setenv("BASCULE_VIEWER_TOKEN", VIEWER_TOKEN)


PLANTED_AMOUNT = "31337.77"
"""A recognisable number planted beside :data:`PLANTED`."""
SOURCE_PLANTED = "ZQSOURCE4242"
GATE = "[datasets.dcir.gate]\nmin_compared = 0\nverification = false\n"
"""A gate that counts the mismatches of the last hour (the lab's open gate looks at none)."""


async def diverge(world: World, *ids: int) -> None:
    """Change dcir records ``ids`` in the target's database behind bascule's back, then read
    each through the proxy (dcir in `shadow`: the target is compared) until it is counted."""
    async with aiohttp.ClientSession(headers=AUTH) as session:
        for rid in ids:
            await world.sql(
                world.target_db,
                "UPDATE dcir SET amount = $2, act_code = $3 WHERE id = $1",
                rid,
                float(PLANTED_AMOUNT),
                PLANTED,
            )
            assert await get(session, f"{world.proxy}/v1/datasets/dcir/records/{rid}") == 200
    await world.settled()


async def test_the_page_shows_a_divergence_in_a_browser(ground: Ground, tmp_path: Path) -> None:
    executable = chromium()  # installed in CI when missing, a skip elsewhere
    async with shadow_world(ground, open_gate=False, extra=GATE) as world:
        await diverge(world, 3)
        admin = world.admin_urls[0]
        async with browser(executable, tmp_path / "profile") as page:
            await page.goto(f"{admin}/")
            # No session: the login form, and not one figure.
            assert await page.evaluate("document.querySelector('input[name=token]') !== null")
            assert "dcir" not in await page.text()
            await page.evaluate(
                "document.querySelector('input[name=token]').value = "
                f"{VIEWER_TOKEN!r}; document.querySelector('form.login').submit()"
            )
            await page.until("document.querySelector('section[data-dataset=\"dcir\"]')")
            await page.goto(f"{admin}/?refresh=1")  # logged in: the page, refreshed every 1 s
            section = "document.querySelector('#dataset-dcir')"
            shown = await page.evaluate(f"{section}.innerText")
            # The dataset and its stage.
            assert await page.evaluate(f"{section}.querySelector('h2').innerText") == "dcir shadow"
            # The failing gate condition, with its figure: one mismatch (the window and the
            # target's gap, which the set-up walk left open, fail too).
            failing = await page.evaluate(
                f"[...{section}.querySelectorAll('.gate tr.failing')]"
                ".map(r => [...r.cells].map(c => c.innerText))"
            )
            assert {r[1] for r in failing} == {"window", "mismatches", "gap"}, failing
            assert ["NO", "mismatches", "1"] in [r[:3] for r in failing]
            assert "gate of shadow -> live: closed" in shown
            # The divergent pointer, with its count, and a trace id column.
            rows = await page.evaluate(
                f"[...{section}.querySelectorAll('.mismatches tbody tr')]"
                ".map(r => [...r.cells].map(c => c.innerText))"
            )
            assert sorted(r[:4] for r in rows) == [
                ["/record/act_code", "body", "changed", "1"],
                ["/record/amount", "body", "changed", "1"],
            ]
            # With the trace ids the ledger keeps for each (none where tracing is off).
            traces = {m["pointer"]: " ".join(m["trace_ids"]) for m in await world.mismatches()}
            assert {r[0]: r[7].strip() for r in rows} == traces
            # The chart is drawn by bascule, inline.
            assert await page.evaluate(f"{section}.querySelectorAll('svg.chart rect').length > 0")
            await page.screenshot(tmp_path / "oncall.png")
            # It refreshes itself: a second divergent read shows without a reload.
            await diverge(world, 5)
            await page.until(
                f"{section}.querySelector('.mismatches tr[data-pointer=\"/record/amount\"]')"
                ".cells[3].innerText === '2'"
            )
            assert PLANTED not in await page.html()


async def test_no_record_value_reaches_the_page_or_its_json(ground: Ground) -> None:
    async with shadow_world(ground) as world:
        await world.sql(
            world.source_db, "UPDATE dcir SET act_code = $1 WHERE id = 4", SOURCE_PLANTED
        )
        await diverge(world, 3, 4)
        admin = world.admin_urls[0]
        async with aiohttp.ClientSession(headers=AUTH) as researcher:
            async with researcher.get(f"{world.proxy}/v1/datasets/dcir/records/4") as resp:
                assert SOURCE_PLANTED in await resp.text()  # the planted values are real
        pages = {}
        async with aiohttp.ClientSession(headers=VIEW) as session:
            # The chart's minutes: both mismatches, once the proxy has written its counts.
            deadline = time.monotonic() + 15
            while True:
                async with session.get(admin + "/api/oncall") as resp:
                    dcir = next(
                        d for d in (await resp.json())["datasets"] if d["dataset"] == "dcir"
                    )
                minutes = dcir["minutes"]
                if sum(m["mismatched"] for m in minutes) == 2:
                    break
                assert time.monotonic() < deadline, minutes
                await asyncio.sleep(0.2)
            assert len(minutes) == 60 and sum(m["compared"] for m in minutes) == 2
            for path in ("/", "/oncall/fragment", "/api/oncall"):
                async with session.get(admin + path) as resp:
                    assert resp.status == 200, path
                    pages[path] = await resp.text()
        # A person's session sees the same.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as person:
            async with person.post(f"{admin}/login", data={"token": VIEWER_TOKEN}) as resp:
                assert resp.status == 200 and resp.url.path == "/"
                pages["/ (session)"] = await resp.text()
    for path, body in pages.items():
        assert "/record/amount" in body and "/record/act_code" in body, path
        for value in (PLANTED, SOURCE_PLANTED, PLANTED_AMOUNT[:-1]):
            assert value not in body, (path, value)


# --- Who sees the page, and what it is made of --------------------------------------------------


@pytest.fixture
async def admin(pg_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[str]:
    """An admin API over a migrated state database (no proxy: the page's access alone)."""
    await migrate_state(pg_url)
    pool = await open_pool(pg_url, max_size=2)
    redis = aioredis.Redis.from_url(redis_url)
    deps = AdminDeps(
        Operations(StageStore(pool), RedisAnnouncer(redis, redis_prefix)),
        None,
        {"operator": OPERATOR_TOKEN},
        VIEWER_TOKEN,
    )
    try:
        async with serve_app(create_admin_app(deps)) as url:
            yield url
    finally:
        await redis.aclose()
        await pool.close()


async def test_the_page_needs_a_token_and_its_session_opens_nothing_else(admin: str) -> None:
    jar = aiohttp.CookieJar(unsafe=True)  # the admin API is on 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as person:
        # No token: the login form, and not one figure; the fragment and the JSON refuse.
        async with person.get(admin + "/") as resp:
            body = await resp.text()
            assert resp.status == 401 and 'name="token"' in body and "dcir" not in body
        for path in ("/oncall/fragment", "/api/oncall"):
            async with person.get(admin + path) as resp:
                assert resp.status == 401 and "dcir" not in await resp.text(), path
        # A wrong token, or a form posted from another site: no session.
        async with person.post(admin + "/login", data={"token": "not-a-token-0123456789"}) as resp:
            assert resp.status == 401 and "not a viewer" in await resp.text()
        async with person.post(
            admin + "/login", data={"token": VIEWER_TOKEN}, headers={"Origin": "http://evil.test"}
        ) as resp:
            assert resp.status == 403
        assert not jar.filter_cookies(URL(admin))
        # The viewer's token: a session cookie, HttpOnly and SameSite=Strict, not the token.
        async with person.post(
            admin + "/login", data={"token": VIEWER_TOKEN}, allow_redirects=False
        ) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/"
            cookie = resp.cookies[SESSION_COOKIE]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
        assert VIEWER_TOKEN not in cookie.value and OPERATOR_TOKEN not in cookie.value
        async with person.get(admin + "/") as resp:
            assert resp.status == 200 and 'data-dataset="dcir"' in await resp.text()
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        async with person.get(admin + "/api/oncall") as resp:
            assert resp.status == 200
            assert "dcir" in {d["dataset"] for d in (await resp.json())["datasets"]}
        # It opens the page only: the admin API still wants its bearer token.
        async with person.get(admin + "/v1/datasets") as resp:
            assert resp.status == 401
        async with person.post(admin + "/v1/datasets/dcir/stage", json={}) as resp:
            assert resp.status == 401
        # Logged out: the form again.
        async with person.post(admin + "/logout") as resp:
            assert resp.status == 200 and resp.url.path == "/login"
        async with person.get(admin + "/") as resp:
            assert resp.status == 401


async def test_every_asset_is_served_by_bascule(admin: str) -> None:
    async with aiohttp.ClientSession(headers=VIEW) as session:
        bodies = {}
        for path in ("/", "/oncall.js", "/oncall.css", "/login"):
            async with session.get(admin + path) as resp:
                assert resp.status == 200, path
                bodies[path] = await resp.text()
    page = bodies["/"]
    assert '<script src="/oncall.js">' in page and 'href="/oncall.css"' in page
    for path, body in bodies.items():  # no CDN, no font, nothing from outside
        assert "http://" not in body and "https://" not in body and "//cdn" not in body, path


def test_every_text_on_the_page_is_escaped() -> None:
    evil = "<script>alert(1)</script>"
    when = "2026-12-07T12:00:00+00:00"
    minute = {"minute": when, "compared": 3, "mismatched": 1}
    data = {
        "at": when,
        "mismatches_since": when,
        "datasets": [
            {
                "dataset": "dcir",
                "stage": "shadow",
                "version": 3,
                "since": when,
                "updated_by": evil,
                "auto_promote": False,
                "gaps": {"source": None, "target": when},
                "gate": {
                    "stage": "shadow",
                    "move": "shadow -> live",
                    "since": when,
                    "ok": False,
                    "conditions": [
                        {"condition": evil, "ok": False, "figure": [evil], "detail": evil}
                    ],
                },
                "minutes": [minute],
                "mismatches": [
                    {
                        "part": evil,
                        "pointer": f"/records/{evil}",
                        "kind": evil,
                        "count": 1,
                        "first_seen": when,
                        "last_seen": when,
                        "trace_ids": [evil],
                        "routes": [evil],
                    }
                ],
                "mismatch_groups": 1,
                "journal": {"backlog": 1, "oldest_pending_seconds": 2.5, "in_doubt": 0, "dead": 1},
                "noise": [
                    {
                        "pointer": evil,
                        "route": evil,
                        "rule": evil,
                        "key": evil,
                        "pairs": 5,
                        "last_seen": when,
                    }
                ],
            }
        ],
    }
    for html in (oncall.page(data), oncall.fragment(data), oncall.unavailable(evil)):
        assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert" not in oncall.login(evil)


def test_a_session_is_the_token_s_and_ends() -> None:
    now = 1_800_000_000.0
    value = oncall.session_value(VIEWER_TOKEN, now)
    assert oncall.session_matches(value, [OPERATOR_TOKEN, VIEWER_TOKEN], now + 60)
    # Another token (the viewer's rotated), a changed MAC or expiry, an ended session: none.
    assert not oncall.session_matches(value, [OPERATOR_TOKEN, "rotated-viewer-token-000"], now)
    version, expires, mac = value.split(".")
    assert not oncall.session_matches(f"{version}.{expires}.{mac[:-1]}0", [VIEWER_TOKEN], now)
    later = int(expires) + 3600
    assert not oncall.session_matches(f"{version}.{later}.{mac}", [VIEWER_TOKEN], now)
    assert not oncall.session_matches(value, [VIEWER_TOKEN], now + oncall.SESSION_SECONDS)
    assert not oncall.session_matches("", [VIEWER_TOKEN], now)
