"""The ``bascule`` command: one entry point; each package registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from bascule.errors import EXIT_ERROR, EXIT_REFUSED, EXIT_USAGE, BasculeError, Refused, UsageError

REGISTRARS: dict[str, tuple[str, ...]] = {
    "bascule.app.replica": ("proxy",),
    "bascule.app.cli": (
        "migrate",
        "status",
        "stage",
        "rollback",
        "gap",
        "history",
        "journal",
        "divergence",
        "noise",
        "gate",
        "auto-promote",
    ),
    "bascule.app.data_cli": ("verify", "backfill"),
    "bascule.app.demo": ("demo",),
    "refapi.cli": ("api",),
}
"""Which module registers which commands (``tests/bascule/test_cli_entry.py`` checks it against
what each one registers): a command imports only its own module. Importing all of them cost
0.7 s before anything ran (aiohttp, redis, psycopg, OpenTelemetry, rich, uvloop), an SRE
command needs half of that."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only its module's commands are registered (imported),
    else every module's (``bascule --help``, a mistyped command)."""
    parser = argparse.ArgumentParser(
        prog="bascule",
        description="Dual-write proxy for a dataset-by-dataset backend cutover.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    owners = [m for m, commands in REGISTRARS.items() if command in commands] or list(REGISTRARS)
    for name in owners:
        importlib.import_module(name).register(sub)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names, if any: its first word that is not an option (or the value
    of ``--log-level``)."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(words))
    args = parser.parse_args(words)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        code: int = args.func(args)
    except Refused as exc:
        print(f"bascule: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except UsageError as exc:
        print(f"bascule: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BasculeError as exc:
        print(f"bascule: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
