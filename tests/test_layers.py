"""scripts/layers: the repository's imports all run down, and one upward import is caught."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "layers"


def run(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, check=False
    )


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


CLEAN = {
    "bascule/__init__.py": "",
    "bascule/errors.py": "",
    "bascule/cli.py": "from bascule.app import ops\n",  # the entry point may import upward
    "bascule/state/__init__.py": "",
    "bascule/state/store.py": "from bascule import errors\n",
    "bascule/app/__init__.py": "",
    "bascule/app/ops.py": "from cutover import controller\nfrom proxy import server\n",
    "shadow/__init__.py": "",
    "shadow/ledger.py": "from bascule.state import store\n",
    "proxy/__init__.py": "",
    "proxy/server.py": "from shadow import ledger\nfrom bascule.errors import X\n",
    "cutover/__init__.py": "",
    "cutover/controller.py": "from shadow.ledger import Y\n",
    "refapi/__init__.py": "",
}


def test_the_repository_has_no_upward_import_and_no_cycle() -> None:
    found = run(ROOT)
    assert found.returncode == 0, found.stdout
    assert "every import runs down, no file cycle" in found.stdout
    assert "bascule/app" in found.stdout and "[layer 4]" in found.stdout


def test_a_clean_fixture_tree_passes(tmp_path: Path) -> None:
    found = run(tree(tmp_path, CLEAN))
    assert found.returncode == 0, found.stdout
    assert "cutover      [layer 3] -> shadow (" in found.stdout


def test_one_upward_import_fails_and_is_named(tmp_path: Path) -> None:
    upward = {**CLEAN, "bascule/state/store.py": "from proxy.server import Server\n"}
    found = run(tree(tmp_path, upward))
    assert found.returncode == 1
    assert (
        "UPWARD IMPORT: bascule/state/store.py: imports proxy.server (bascule/state -> proxy)"
        in found.stdout
    )


def test_siblings_on_one_layer_may_not_import_each_other(tmp_path: Path) -> None:
    sideways = {**CLEAN, "cutover/controller.py": "from proxy import server\n"}
    found = run(tree(tmp_path, sideways))
    assert found.returncode == 1
    assert "(cutover -> proxy)" in found.stdout


def test_an_import_hidden_under_type_checking_still_counts(tmp_path: Path) -> None:
    hidden = {
        **CLEAN,
        "shadow/ledger.py": "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from proxy.server import Server\n",
    }
    found = run(tree(tmp_path, hidden))
    assert found.returncode == 1 and "(shadow -> proxy)" in found.stdout


def test_a_file_cycle_fails(tmp_path: Path) -> None:
    circle = {
        **CLEAN,
        "proxy/replayer.py": "from proxy.resolver import Resolver\n",
        "proxy/resolver.py": "from proxy import replayer\n",
    }
    found = run(tree(tmp_path, circle))
    assert found.returncode == 1
    assert "IMPORT CYCLE: proxy.replayer -> proxy.resolver -> proxy.replayer" in found.stdout
