"""``bascule status --watch``: a live table, redrawn in place on a terminal, until Ctrl-C."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import time
from pathlib import Path

from bascule.procs import bascule_argv
from refapi.lab import migrate_state
from tests.harness import cli_env

HEAD = b"bascule status at "


def read_until(fd: int, proc: subprocess.Popen[bytes], done: bytes, count: int) -> bytes:
    """What the terminal showed, once ``done`` has appeared ``count`` times."""
    seen = b""
    deadline = time.monotonic() + 30
    while seen.count(done) < count:
        assert proc.poll() is None, (
            f"exited with {proc.returncode}: {seen.decode(errors='replace')}"
        )
        assert time.monotonic() < deadline, f"{count} frames never came: {seen!r}"
        try:
            seen += os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.05)
    return seen


def drain(fd: int) -> bytes:
    """The rest of what the terminal showed (the process has exited)."""
    rest = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):  # nothing left; EIO once the follower is closed
            return rest
        if not chunk:
            return rest
        rest += chunk


async def test_watch_redraws_the_table_until_ctrl_c(
    tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str
) -> None:
    await migrate_state(pg_url)
    env = {**cli_env(tmp_path, pg_url, redis_url, redis_prefix), "COLUMNS": "200", "LINES": "60"}
    env.pop("NO_COLOR", None)
    leader, follower = pty.openpty()  # a terminal, as an SRE's: rich draws in place
    os.set_blocking(leader, False)
    proc = subprocess.Popen(
        bascule_argv("status", "--watch", "--interval", "0.2"),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    try:
        shown = read_until(leader, proc, HEAD, 3)
        # Each frame is the status table, drawn again over the last: the cursor moves up and
        # the lines are erased (a live display, not a log).
        assert shown.count(b"dcir") >= 3 and b"pmsi" in shown and b"source" in shown
        assert b"\x1b[1A" in shown and b"\x1b[2K" in shown
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=30) == 0
        shown += drain(leader)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    assert b"Traceback" not in shown
