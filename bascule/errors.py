"""Every error bascule raises on purpose, in one tree.

    BasculeError
    ├── ConfigError(ValueError)        a configuration file or variable is wrong; names file and key
    ├── StoreError(ConnectionError)    a state store (Postgres, Redis) cannot be reached or started
    └── UsageError(ValueError)         a command was called with arguments that cannot work

Builtins are mixed in where they say something true about the error, so callers that only know
the standard library still catch them sensibly.
"""

from __future__ import annotations


class BasculeError(Exception):
    """Base of every error bascule raises on purpose."""


class ConfigError(BasculeError, ValueError):
    """A configuration file or variable is wrong. The message names the file and the key."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


class StoreError(BasculeError, ConnectionError):
    """A state store cannot be reached or started."""


class UsageError(BasculeError, ValueError):
    """A command was called with arguments that cannot work."""
