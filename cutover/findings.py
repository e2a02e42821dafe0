"""What a verification is asked, and what it found: options, per-table figures, the report.

Figures are counts, rates and record tokens; keys stay in memory (``VerifyReport.found``) and
are shown only with ``--show-keys``, audited first (``cutover/verify.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from bascule.errors import BasculeError
from bascule.stages import Side
from cutover.checksum import Key
from cutover.tables import SchemaDiff

Mode = Literal["full", "incremental"]
KINDS = ("missing", "extra", "changed")
_SHOWN_TOKENS = 1000
"""Tokens kept per kind in a run's figures (counts are always whole)."""


@dataclass(frozen=True)
class Options:
    mode: Mode = "full"
    resume: bool = False
    repair: bool = False
    show_keys: bool = False
    reason: str | None = None
    drain_wait: float = 30.0
    """Seconds a re-check round waits for the open writes of the records it checks."""
    settle_for: float = 120.0
    """Seconds keys that differ are checked again, at most, before they are called unsettled."""


@dataclass
class TableReport:
    table: str
    key: str
    schema: SchemaDiff
    chunks: int = 0
    differing_chunks: int = 0
    rows: dict[Side, int] = field(default_factory=dict)
    """Rows each side holds (as its scan counted them)."""
    scanned: dict[Side, int] = field(default_factory=dict)
    """Rows scanned by this run (a resumed run scans only what was left)."""
    seconds: dict[Side, float] = field(default_factory=dict)

    def rate(self, side: Side) -> float:
        seconds = self.seconds.get(side, 0.0)
        return self.scanned.get(side, 0) / seconds if seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "key": self.key,
            "chunks": self.chunks,
            "differing_chunks": self.differing_chunks,
            "rows": {s.value: self.rows.get(s, 0) for s in Side},
            "rows_per_second": {s.value: round(self.rate(s)) for s in Side},
            "schema": self.schema.as_json(),
        }


@dataclass
class VerifyReport:
    run: int
    dataset: str
    mode: Mode
    stage: str
    authority: Side
    verified: Side
    swept_since: datetime
    status: str = "running"
    error: str | None = None
    tables: list[TableReport] = field(default_factory=list)
    found: dict[str, dict[Key, str]] = field(default_factory=lambda: {k: {} for k in KINDS})
    """Kind -> key -> token. Keys stay in memory: shown only with ``--show-keys``."""
    unsettled: dict[Key, str] = field(default_factory=dict)
    repair: dict[str, Any] | None = None
    repaired_all: bool = False
    gap: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    show_keys: bool = False

    @property
    def schema_differs(self) -> bool:
        return any(not t.schema.empty for t in self.tables)

    @property
    def divergent(self) -> bool:
        return self.schema_differs or any(self.found[k] for k in KINDS)

    @property
    def exit_code(self) -> int:
        """0 clean (or every difference repaired), 4 divergent, 1 could not conclude."""
        if self.status == "clean":
            return 0
        if self.status == "divergent":
            return 0 if self.repaired_all and not self.schema_differs else 4
        return 1

    def figures(self) -> dict[str, Any]:
        """What the run row keeps: counts, rates and tokens, never a key."""
        out: dict[str, Any] = {
            "tables": [t.as_json() for t in self.tables],
            "seconds": round(self.seconds, 3),
            "gap": self.gap,
        }
        for kind in KINDS:
            tokens = sorted(self.found[kind].values())
            out[kind] = {"count": len(tokens), "tokens": tokens[:_SHOWN_TOKENS]}
        tokens = sorted(self.unsettled.values())
        out["unsettled"] = {"count": len(tokens), "tokens": tokens[:_SHOWN_TOKENS]}
        if self.repair is not None:
            out["repair"] = self.repair
        return out

    def as_json(self) -> dict[str, Any]:
        out = {
            "run": self.run,
            "dataset": self.dataset,
            "mode": self.mode,
            "status": self.status,
            "stage": self.stage,
            "authority": self.authority.value,
            "verified": self.verified.value,
            "swept_since": self.swept_since.isoformat(),
            **self.figures(),
        }
        if self.error:
            out["error"] = self.error
        if self.show_keys:
            out["keys"] = {kind: sorted(self.found[kind]) for kind in KINDS} | {
                "unsettled": sorted(self.unsettled)
            }
        return out


def other(side: Side) -> Side:
    return Side.TARGET if side is Side.SOURCE else Side.SOURCE


def describe(exc: BaseException) -> str:
    """What stopped a run, for its row: our own errors say it without values; anything else
    only by its class (a library's message may quote a row)."""
    if isinstance(exc, BasculeError):
        return str(exc)[:500]
    return type(exc).__name__
