"""The ``bascule`` entry point registers each command from the one module that owns it, and
imports only that module for a command (``bascule/cli.py``'s REGISTRARS)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from bascule import cli


def test_each_module_registers_exactly_the_commands_the_entry_point_says() -> None:
    for name, commands in cli.REGISTRARS.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(name).register(sub)
        assert sorted(sub.choices) == sorted(commands), name


def test_help_lists_every_command() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    every = {c for commands in cli.REGISTRARS.values() for c in commands}
    assert set(sub.choices) == every


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["status", "--json"], "status"),
        (["--log-level", "DEBUG", "stage", "dcir", "live"], "stage"),
        (["--log-level=DEBUG", "proxy"], "proxy"),
        (["--help"], None),
        ([], None),
    ],
)
def test_the_command_is_found_before_the_options(argv: list[str], command: str | None) -> None:
    assert cli._command(argv) == command


def test_an_sre_command_imports_neither_the_proxy_nor_the_data_jobs() -> None:
    """`bascule status` parses without importing the proxy's, the data jobs' or the reference
    API's modules (nor uvloop or psycopg, which only they need)."""
    probe = (
        "import sys, bascule.cli as cli\n"
        "cli.build_parser(cli._command(['status'])).parse_args(['status'])\n"
        "heavy = ['bascule.app.replica', 'bascule.app.data_cli', 'refapi.cli', 'psycopg',"
        " 'uvloop', 'bascule.app.demo']\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == ""


def test_a_mistyped_command_still_lists_every_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bascule", "statsu"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2
    assert "invalid choice: 'statsu'" in done.stderr and "backfill" in done.stderr
