"""The ``bascule`` command: one entry point; each package registers its own subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from bascule.errors import EXIT_ERROR, EXIT_REFUSED, EXIT_USAGE, BasculeError, Refused, UsageError


def build_parser() -> argparse.ArgumentParser:
    from bascule.app import cli as cutover_cli
    from bascule.app import data_cli, demo
    from bascule.app import replica as proxy_app
    from refapi import cli as refapi_cli

    parser = argparse.ArgumentParser(
        prog="bascule",
        description="Dual-write proxy for a dataset-by-dataset backend cutover.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    proxy_app.register(sub)
    cutover_cli.register(sub)
    data_cli.register(sub)
    demo.register(sub)
    refapi_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
