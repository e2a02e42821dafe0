"""Every error bascule raises on purpose, in one tree.

    BasculeError
    ├── ConfigError(ValueError)          a configuration file or variable is wrong; names file, key
    ├── UsageError(ValueError)           a command was called with arguments that cannot work
    ├── Refused                          a request the rules forbid; nothing changed (CLI exit 3)
    │   ├── IllegalMove(ValueError)      a stage change the stage rules forbid; names legal moves
    │   ├── UnknownDataset(LookupError)  no such dataset; names the known ones
    │   ├── UnknownStage(ValueError)     no such stage; names the stages
    │   ├── UnknownProposal(LookupError) no such noise proposal for that dataset and pointer
    │   └── StaleVersion                 the compare-and-set lost: someone changed it first
    ├── RouteError(ValueError)           a researcher request the proxy will not route (4xx)
    ├── StoreError(ConnectionError)      a state store (Postgres, Redis) cannot be reached/started
    │   ├── RecordBusy                   a write waited too long for its record's lock (503)
    │   └── SchemaError                  the state schema is not the version this bascule expects
    ├── UpstreamError                    a backend did not answer properly
    │   ├── UpstreamUnreachable(ConnectionError)   nothing answered (502)
    │   ├── UpstreamTimeout(TimeoutError)          it did not answer in time (504)
    │   └── UpstreamBusy                           no connection to it free in time (503)
    └── ProcessFailed(RuntimeError)      a child server exited or never became healthy

Builtins are mixed in where they say something true about the error, so callers that only know
the standard library still catch them sensibly.
"""

from __future__ import annotations

# What the ``bascule`` command exits with (docs/operations.md).
EXIT_OK = 0
EXIT_ERROR = 1
"""An error: a store unreachable, a backend that answers garbage."""
EXIT_USAGE = 2
"""Bad usage: a missing reason, a malformed argument (:class:`UsageError`)."""
EXIT_REFUSED = 3
"""Refused, nothing changed (:class:`Refused`); also a gate that does not hold."""
EXIT_DIVERGENT = 4
"""A verification found the two sides' data differ."""


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


class UsageError(BasculeError, ValueError):
    """A command was called with arguments that cannot work."""


class Refused(BasculeError):
    """A request the rules forbid. Nothing was changed."""


class IllegalMove(Refused, ValueError):
    def __init__(self, message: str, dataset: str, current: str, wanted: str) -> None:
        self.dataset, self.current, self.wanted = dataset, current, wanted
        super().__init__(message)


class UnknownDataset(Refused, LookupError):
    def __init__(self, dataset: str, known: list[str]) -> None:
        self.dataset = dataset
        names = ", ".join(sorted(known)) or "none"
        super().__init__(f"unknown dataset {dataset!r}; known datasets: {names}")


class UnknownStage(Refused, ValueError):
    def __init__(self, text: str, stages: list[str]) -> None:
        self.text = text
        super().__init__(f"unknown stage {text!r}; the stages are {', '.join(stages)}")


class UnknownProposal(Refused, LookupError):
    """No noise proposal at that pointer (and route) of that dataset."""

    def __init__(self, dataset: str, pointer: str, route: str | None = None) -> None:
        self.dataset, self.pointer, self.route = dataset, pointer, route
        where = f" on route {route!r}" if route is not None else ""
        super().__init__(
            f"{dataset}: no noise proposal at {pointer!r}{where}; see `bascule noise {dataset}`"
        )


class StaleVersion(Refused):
    """Someone else changed the dataset first: the compare-and-set found another version."""

    def __init__(self, dataset: str, expected: int, found: int | None) -> None:
        self.dataset, self.expected, self.found = dataset, expected, found
        super().__init__(
            f"{dataset}: the stage changed while this change was being made "
            f"(expected version {expected}, found {found}); look at `bascule status` and retry"
        )


class RouteError(BasculeError, ValueError):
    """A request the proxy refuses to route. ``status`` and ``code`` go into the JSON answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code = status, code
        super().__init__(message)


class StoreError(BasculeError, ConnectionError):
    """A state store cannot be reached or started."""


class RecordBusy(StoreError):
    """A write waited too long for the lock of its record (another write held it)."""


class SchemaError(StoreError):
    """The state schema is not the version this bascule expects; the message says what to run."""


class UpstreamError(BasculeError):
    """A backend did not answer properly. ``sent``: the request may have reached it (a write
    that failed after being sent may have been applied: it is in doubt, not failed).
    ``status`` and ``code``: what the researcher is answered."""

    status = 502
    code = "backend_unreachable"

    def __init__(self, backend: str, message: str, *, sent: bool = True) -> None:
        self.backend = backend
        self.sent = sent
        super().__init__(f"backend {backend}: {message}")


class UpstreamUnreachable(UpstreamError, ConnectionError):
    """Nothing answered: connection refused or reset before any answer (502)."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The backend did not connect or answer in time (504)."""

    status = 504
    code = "backend_timeout"


class UpstreamBusy(UpstreamError):
    """Every connection to the backend stayed in use past ``pool_timeout``: never sent (503)."""

    status = 503
    code = "backend_busy"


class ProcessFailed(BasculeError, RuntimeError):
    """A child process exited or never became healthy."""
