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
    # Before: the target cloud is empty; after the backfill, dcir answers alike on both.
    before = out[out.index("before the migration") : out.index("the cutover, one dataset")]
    assert re.findall(r"│ (yes|no) +│", before) == ["no"] * 4
    assert "404 by scaleway" in before
    after = out[out.index("after the backfill") : out.index("2. shadow")]
    assert re.findall(r"│ (yes|no) +│", after) == ["yes"] * 3
    # The target's gap refuses `shadow` until a verification closes it: the backfill's.
    assert "REFUSED  gaps: the target has had an open gap" in out
    assert "refused, as the story expects: dcir: cannot move dualwrite -> shadow" in out
    assert "dcir: clean (run 1, full, in dualwrite: the target checked against the source" in out
    assert "the target's gap (open since" in out and "is closed (audited)" in out
    # In shadow, an amount changed straight in the target's database is found by comparing
    # researchers' reads, and shown as where and what kind, with a trace id, never the value;
    # the gate then refuses live, and a verification finds the record (a token) and repairs it.
    assert re.search(r"│ body +│ /record/amount +│ changed +│ 1 +│", out), out
    assert "refused, as the story expects: dcir: the gate refuses shadow -> live" in out
    assert "mismatches: 1 mismatches in the window" in out
    assert re.search(r"│ changed +│ [0-9a-f]{32} +│", out)
    assert "DIVERGENT, then repaired" in out and "1 written, 0 deleted" in out
    # With fresh evidence, the controller promotes dcir once its gate holds.
    assert "the gate is closed" in out
    assert "the controller moved dcir to live: auto_promote: the gate holds" in out
    # Through the proxy, dcir moved to the target and back while pmsi stayed put.
    assert "dcir live: researchers calling" in out
    assert "served dcir by scaleway, pmsi by azure" in out
    assert "after rollback: researchers calling" in out
    # A researcher's write in live: answered by the target, replayed to the source.
    assert "(amount 123.45): scaleway holds 123.45, azure holds 123.45" in out, out
    # No raw log line breaks the story's layout.
    assert " WARNING " not in out and " ERROR " not in out
    assert "stopped cleanly" in out
