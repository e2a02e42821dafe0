"""Dropping the tests' databases off the tests' path.

``DROP DATABASE`` waits for a checkpoint on PostgreSQL 15 (``dropdb`` requests an immediate
one so that no dirty buffer of the dropped files is written back later): about 3 s per drop on
the 2-core CI machine, three per test world, about a third of the suite's time spent in
teardowns. The drops go to a thread of their own instead, which drops what has piled up at
once (concurrent requests for a checkpoint are served by the same one) while the next test
runs; the session waits for it before its stores stop, and a drop that failed is reported.
"""

from __future__ import annotations

import asyncio
import queue
import threading

from bascule.state.servers import drop_database

_AT_ONCE = 4
"""Drops in flight at once: each holds one session of the server's 100 for a few seconds."""


class Dropper:
    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.pending: queue.Queue[str | None] = queue.Queue()
        self.failures: list[str] = []
        self.dropped = 0
        self.thread = threading.Thread(target=self._run, name="database-dropper", daemon=True)
        self.thread.start()

    def drop(self, name: str) -> None:
        self.pending.put(name)

    def close(self, timeout: float = 300.0) -> None:
        """Wait for every drop asked for so far."""
        self.pending.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.failures.append(f"drops still running after {timeout:.0f} s")

    def _run(self) -> None:
        done = False
        while not done:
            batch: list[str] = []
            item = self.pending.get()
            while True:
                if item is None:
                    done = True
                else:
                    batch.append(item)
                try:
                    item = self.pending.get_nowait()
                except queue.Empty:
                    break
            if batch:
                asyncio.run(self._drop_all(batch))

    async def _drop_all(self, names: list[str]) -> None:
        slots = asyncio.Semaphore(_AT_ONCE)

        async def one(name: str) -> None:
            async with slots:
                try:
                    await drop_database(self.admin_url, name)
                    self.dropped += 1
                except Exception as exc:  # reported at the session's end
                    self.failures.append(f"{name}: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(n) for n in names))
