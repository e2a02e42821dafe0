"""A real browser for the tests of what bascule shows people: Debian's headless Chromium, driven
over the DevTools protocol (a WebSocket, with aiohttp: no driver, no browser download).

:func:`chromium` finds ``/usr/bin/chromium``. Missing, it is installed from Debian's packages
when ``CI=true`` (``apt-get install -y chromium``, once per machine, under a lock so that two
xdist workers do not run apt at once); outside CI the test is skipped, saying how to install
it.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import itertools
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM = "/usr/bin/chromium"
INSTALL = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
HOW = "install Debian's chromium (`apt-get install chromium`), or run the tests with CI=true"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1800",
)


def chromium() -> str:
    """The browser's path: installed in CI when missing, a skip elsewhere."""
    found = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if found:
        return found
    if os.environ.get("CI") != "true":
        pytest.skip(f"no headless Chromium on this machine: {HOW}")
    with open("/tmp/bascule-chromium-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits, then finds it installed
        if not os.path.exists(CHROMIUM):
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            for argv in (["apt-get", "update", "-q"], INSTALL):
                done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    pytest.fail(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}{done.stderr}")
    return CHROMIUM


class Page:
    """One tab, driven over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        sent = next(self.ids)
        await self.ws.send_json({"id": sent, "method": method, "params": params})
        async with asyncio.timeout(30):
            async for msg in self.ws:
                answer = msg.json()
                if answer.get("id") == sent:  # events (no id) are not listened to
                    if "error" in answer:
                        raise AssertionError(f"{method}: {answer['error']}")
                    result: dict[str, Any] = answer["result"]
                    return result
        raise AssertionError(f"the browser closed during {method}")

    async def evaluate(self, expression: str) -> Any:
        found = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in found:
            raise AssertionError(f"{expression}: {found['exceptionDetails']}")
        return found["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.loaded()

    async def loaded(self) -> None:
        await self.until("document.readyState === 'complete'")

    async def until(self, expression: str, within: float = 15.0) -> None:
        """Wait for ``expression`` to be true in the page."""
        deadline = time.monotonic() + within
        while True:
            try:
                if await self.evaluate(f"Boolean({expression})"):
                    return
            except AssertionError:  # the page is navigating: no document to ask yet
                pass
            if time.monotonic() > deadline:
                shown = await self.evaluate("location.href + '\\n' + document.body.innerText")
                raise AssertionError(f"never true in the page: {expression}; it shows {shown}")
            await asyncio.sleep(0.1)

    async def html(self) -> str:
        found: str = await self.evaluate("document.documentElement.outerHTML")
        return found

    async def text(self) -> str:
        found: str = await self.evaluate("document.body.innerText")
        return found

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@asynccontextmanager
async def browser(executable: str, profile: Path) -> AsyncIterator[Page]:
    """A headless Chromium with a fresh profile in ``profile``, and its one tab."""
    profile.mkdir(parents=True, exist_ok=True)
    argv = [executable, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0"]
    proc = subprocess.Popen(
        [*argv, "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port = port_file.read_text().splitlines()[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            tab = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield Page(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
