"""`bascule demo` tells the story end to end and exits 0 (on free ports, so it can run anywhere)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from bascule.procs import bascule_argv
from bascule.state.servers import free_port

EXAMPLE = Path(__file__).parents[2] / "deploy" / "bascule.example.toml"


def test_demo_runs_the_story_and_exits_cleanly(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    for port in ("9001", "9002", "8080", "8081"):
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    config = tmp_path / "demo.toml"
    config.write_text(text)
    done = subprocess.run(
        bascule_argv("demo", "--config", str(config), "--rows", "300", "--duration", "0"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    # Both clouds answered real queries, identically.
    assert out.count("200 by azure") == 5 and out.count("200 by scaleway") == 5
    assert re.findall(r"│ (yes|NO) +│", out) == ["yes"] * 5
    # The target's gap refuses `shadow` until the demo closes it, saying on what grounds.
    assert "bascule: refused: dcir: cannot move dualwrite -> shadow: the target has" in out
    assert "seeded identically; no verification has been run yet" in out
    assert "dcir: the target's gap (open since" in out and "is closed, in dualwrite" in out
    # In shadow, an amount changed straight in the target's database is found by comparing
    # researchers' reads, and shown as where and what kind, with a trace id.
    assert re.search(r"│ body +│ /record/amount +│ changed +│ 1 +│", out), out
    # Through the proxy, dcir moved to the target and back while pmsi stayed put.
    assert "dcir live: researchers calling" in out
    assert "served dcir by scaleway, pmsi by azure" in out
    assert "after rollback: researchers calling" in out
    # A researcher's write in live: answered by the target, replayed to the source.
    assert "(amount 123.45): scaleway holds 123.45, azure holds 123.45" in out, out
    assert "stopped cleanly" in out
