"""Log lines for on-call: one JSON object per line (a log shipper's), or a line for people on a
terminal (``[telemetry] logs``).

Each line carries, besides time, level, logger and message, what the running task serves:
``trace_id`` (the researcher's request or the span it runs in), ``dataset``, ``stage`` and
``route`` (the template, never the path). Messages name datasets, templates, error classes and
sequence numbers; bascule never logs a record value, a body, a query string or a token (tests
plant a value and look for it in the logs).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

from bascule import telemetry

_FIELDS = ("dataset", "stage", "route")


def context() -> dict[str, Any]:
    """``trace_id``, ``dataset``, ``stage``, ``route`` of what the running task serves."""
    out: dict[str, Any] = {}
    trace_id = telemetry.trace_id_now()
    if trace_id is not None:
        out["trace_id"] = trace_id
    req = telemetry.current.get()
    if req is not None:
        if req.dataset is not None:
            out["dataset"] = req.dataset
        if req.stage is not None:
            out["stage"] = req.stage
        out["route"] = req.route
    return out


class JsonLines(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(context())
        for name in _FIELDS:  # a caller's extra=... names what it works on
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class Readable(logging.Formatter):
    """A line for people: the usual one, with the trace id and dataset when known."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        found = context()
        for name in _FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                found[name] = value
        if not found:
            return text
        tags = " ".join(f"{k}={v}" for k, v in found.items() if k != "trace_id")
        trace_id = found.get("trace_id")
        suffix = " ".join(x for x in (tags, f"trace={trace_id}" if trace_id else "") if x)
        return f"{text} [{suffix}]"


def setup(mode: Literal["auto", "json", "text"], level: int | None = None) -> None:
    """The root logger's lines as ``mode`` says (``auto``: text on a terminal, else JSON)."""
    use_json = mode == "json" or (mode == "auto" and not sys.stderr.isatty())
    formatter: logging.Formatter = JsonLines() if use_json else Readable()
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(formatter)
    if level is not None:
        root.setLevel(level)
