"""The on-call page on the admin port: a real proxy in `shadow`, a divergence planted in the
target's database behind bascule's back and read through the proxy, then the page as a person
sees it (headless Chromium, logged in with the viewer token) and as a script reads it (its
HTML and its JSON), where no record value may ever appear."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from refapi.lab import AUTH, VIEWER_TOKEN
from tests.browser import browser, chromium
from tests.conftest import Ground
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
            await page.goto(f"{admin}/?refresh=1")
            # No session: the login form, and not one figure.
            assert await page.evaluate("document.querySelector('input[name=token]') !== null")
            assert "dcir" not in await page.text()
            await page.evaluate(
                "document.querySelector('input[name=token]').value = "
                f"{VIEWER_TOKEN!r}; document.querySelector('form.login').submit()"
            )
            await page.until("document.querySelector('section[data-dataset=\"dcir\"]')")
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
