"""What a comparison reports: where two answers differ and how, never what they hold.

A difference is a part (status, header, body), an RFC 6901 pointer and a kind; no value and no
value hash (a low-entropy value is reversed by trying every possibility). Array elements are
named by position. An object member whose name is not a plain field name (:data:`PLAIN_NAME`)
is named by the caller's keyed token, so a map keyed by patient id never puts an id in a pointer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from shadow.pointers import escape

Part = Literal["status", "header", "body"]
Kind = Literal["changed", "missing", "extra", "type"]
Segment = str | int
"""A step of a raw path: a member name as the answer spells it, or a position."""

COUNT_CAP = 10_000
"""Differences counted beyond ``limit`` before the walk stops: a wholly different answer costs
no more than this many, and ``truncated`` then reads "at least"."""

PLAIN_NAME = re.compile(r"[a-z_][a-z_]{0,47}[0-9]{0,2}")
"""Member names shown as they are: lower-case words joined by ``_``, with at most two trailing
digits (``patient_id``, ``icd10``, ``sum_amount``). Anything else (digits inside, capitals, any
other character, longer) is tokenized: ``P1a2b...``, ``75``, ``2A``, ``I21.9``, and lower-case
hex such as ``p0a1b2c3``. A map keyed by lower-case words (``home``, ``hospital``) keeps them in
the clear: a data key that is a plain lower-case word is a category, not an identifier."""

_PART_ORDER: dict[str, int] = {"status": 0, "header": 1, "body": 2}
_KIND_ORDER: dict[str, int] = {"changed": 0, "missing": 1, "extra": 2, "type": 3}


@dataclass(frozen=True)
class Difference:
    part: Part
    pointer: str
    """RFC 6901: ``""`` for the status and a whole body, ``/<lower-case name>`` for a header."""
    kind: Kind
    """``missing``: present in the serving answer only; ``extra``: in the other only;
    ``type``: JSON types differ (a body that is JSON against one that is not, too)."""


@dataclass(frozen=True)
class Diff:
    differences: tuple[Difference, ...]
    """At most ``limit``, sorted: status, headers, then body pointers in document order."""
    truncated: int = 0
    """Differences found beyond ``limit`` (counting stops at :data:`COUNT_CAP`)."""

    @property
    def equal(self) -> bool:
        return not self.differences and not self.truncated


class Full(Exception):
    """Enough differences counted: the comparison stops where it is."""


class Found:
    """The differences found: the first ``limit`` kept, named; the rest only counted."""

    def __init__(self, limit: int, token: Callable[[str], str]) -> None:
        self.limit = limit
        self.count = 0
        self.kept: list[tuple[tuple[Any, ...], Difference]] = []
        self._token = token
        self._tokens: dict[str, str] = {}

    def add(self, part: Part, path: Sequence[Segment], kind: Kind, *, plain: bool = False) -> None:
        """One difference at ``path``; ``plain``: its names come from the rules, not the data."""
        self.count += 1
        if len(self.kept) < self.limit:
            segments = [self._segment(s, plain) for s in path]
            pointer = "".join("/" + escape(s) for s in segments)
            # Sorted as shown (positions as numbers, names as tokens): the order gives away
            # nothing about the raw names.
            order = tuple(
                (0, s, "") if type(s) is int else (1, 0, t)
                for s, t in zip(path, segments, strict=True)
            )
            key = (_PART_ORDER[part], order, _KIND_ORDER[kind])
            self.kept.append((key, Difference(part, pointer, kind)))
        elif self.count - self.limit >= COUNT_CAP:
            raise Full

    def _segment(self, segment: Segment, plain: bool) -> str:
        if type(segment) is int:
            return str(segment)
        assert isinstance(segment, str)
        if plain or PLAIN_NAME.fullmatch(segment):
            return segment
        named = self._tokens.get(segment)
        if named is None:
            named = self._tokens[segment] = self._token(segment)
        return named

    def mark(self) -> tuple[int, int]:
        return self.count, len(self.kept)

    def reset(self, mark: tuple[int, int]) -> None:
        """Forget what was found since ``mark``."""
        self.count, kept = mark
        del self.kept[kept:]

    def diff(self) -> Diff:
        self.kept.sort(key=lambda item: item[0])
        return Diff(tuple(d for _, d in self.kept), max(0, self.count - self.limit))
