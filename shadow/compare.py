"""The comparison engine: two answers and the rules of their route in, a diff without values out.

Pure: no I/O, no clock. The proxy calls :func:`compile_rules` once per dataset or route and
:func:`compare` once per shadow read. A diff (:mod:`shadow.diff`) says where and how the answers
differ, never what they hold.

The status, then the allow-listed headers, then the body: JSON when both bodies parse as JSON,
their bytes otherwise. A JSON body is parsed (msgspec: integers of any size stay exact), made
ready by the rules along their patterns only (:mod:`shadow.normalize`), and walked where ``==``
says it differs (:mod:`shadow.walk`). Before that, two bodies that differ only in values the
rules ignore (a page served twice, its ``served_at`` alone changed) are recognised without
decoding either (:mod:`shadow.masking`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from bascule.config import CompareRules
from shadow.diff import COUNT_CAP, PLAIN_NAME, Diff, Difference, Found, Full, Kind, Part
from shadow.masking import Plan, equal_but_ignored
from shadow.normalize import prepare
from shadow.pointers import Node, compile_patterns
from shadow.slices import SLICE_FROM, compare_slices
from shadow.walk import no_booleans, walk

_DECODE = msgspec.json.Decoder()
_NOT_JSON = object()

MASK_FROM = 4096
"""Bodies from this size (the larger of the two, bytes) are first checked for differing only in
ignored values (:mod:`shadow.masking`): below it, decoding both costs about as little."""
SLICES_FROM = 2_000_000
"""Bodies from this size that differ are compared by slices (:mod:`shadow.slices`). Its cost
grows with the size, the full path's faster (measured on pages of shuffled records, CPU time:
0.9x the full path's at 100 KB and 1 MB, even at 2 MB, 1.35x faster at 3 MB, 1.5x at 5 MB)."""


@dataclass(frozen=True)
class Answer:
    """One side's answer, as the proxy received it."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    """Names in any case; a multidict's repeated names are all compared."""
    body: bytes = b""


@dataclass(frozen=True)
class Rules:
    """Comparison rules compiled once: the trie of pointer patterns, lower-cased header names."""

    headers: tuple[str, ...]
    ignore: tuple[str, ...]
    unordered: tuple[tuple[str, str], ...]
    tolerance: float
    instants: bool
    trie: Node | None = field(default=None, compare=False, repr=False)
    """Built from ``ignore`` and ``unordered``, which stand for it in ``==`` and ``repr``."""
    plan: Plan | None = field(default=None, compare=False, repr=False)
    """The decoder of ignored values (:mod:`shadow.masking`), built from the trie."""


def compile_rules(rules: CompareRules) -> Rules:
    """Raises ValueError for a malformed pointer or a negative tolerance."""
    if rules.numeric_tolerance < 0:
        raise ValueError("numeric_tolerance must not be negative")
    trie = compile_patterns(rules.ignore, rules.unordered)
    return Rules(
        headers=tuple(sorted({name.lower() for name in rules.headers})),
        ignore=tuple(rules.ignore),
        unordered=tuple(sorted(rules.unordered.items())),
        tolerance=float(rules.numeric_tolerance),
        instants=rules.timestamps_as_instants,
        trie=trie,
        plan=Plan(trie),
    )


def compare(
    serving: Answer,
    other: Answer,
    rules: Rules,
    token: Callable[[str], str],
    limit: int = 100,
) -> Diff:
    """How ``other`` differs from ``serving`` under ``rules``.

    ``token`` names a member that is not a plain field name (a keyed HMAC in the proxy). At most
    ``limit`` differences are listed: the first found in document order (members by name,
    elements by position); ``truncated`` counts the others.
    """
    return _compare(serving, other, rules, token, limit, MASK_FROM)


def _compare(
    serving: Answer,
    other: Answer,
    rules: Rules,
    token: Callable[[str], str],
    limit: int,
    mask_from: int | None,
    slices_from: int = SLICES_FROM,
    slice_from: int = SLICE_FROM,
) -> Diff:
    """:func:`compare`, bodies from ``mask_from`` bytes first checked by :mod:`shadow.masking`
    and from ``slices_from`` compared by :mod:`shadow.slices` (slices from ``slice_from`` bytes
    cut again); with None, neither: the full path alone, which both must always agree with."""
    if limit < 0:
        raise ValueError("limit must not be negative")
    found = Found(limit, token)
    try:
        if serving.status != other.status:
            found.add("status", (), "changed")
        _headers(serving.headers, other.headers, rules.headers, found)
        _body(serving.body, other.body, rules, found, mask_from, slices_from, slice_from)
    except Full:
        pass
    return found.diff()


def _headers(
    serving: Mapping[str, str], other: Mapping[str, str], names: tuple[str, ...], found: Found
) -> None:
    if not names:
        return
    ours, theirs = _values(serving), _values(other)
    for name in names:
        a, b = ours.get(name), theirs.get(name)
        if a != b:
            kind: Kind = "missing" if b is None else "extra" if a is None else "changed"
            found.add("header", (name,), kind, plain=True)


def _values(headers: Mapping[str, str]) -> dict[str, list[str]]:
    """Every value of each header, in order: a multidict (aiohttp's) repeats a name in items()."""
    values: dict[str, list[str]] = {}
    for name, value in headers.items():
        values.setdefault(name.lower(), []).append(value)
    return values


def _body(
    serving: bytes,
    other: bytes,
    rules: Rules,
    found: Found,
    mask_from: int | None,
    slices_from: int,
    slice_from: int,
) -> None:
    # Byte-equal bodies are equal under any rules, and so are bodies that differ only in what
    # the rules ignore; large bodies that differ are decoded only where their bytes do.
    if serving == other:
        return
    size = max(len(serving), len(other))
    if mask_from is not None and size >= mask_from:
        if rules.plan is not None and equal_but_ignored(serving, other, rules.plan):
            return
        if size >= slices_from and compare_slices(
            serving,
            other,
            rules.trie,
            rules.plan,
            found,
            tolerance=rules.tolerance,
            instants=rules.instants,
            slice_from=slice_from,
        ):
            return
    _body_decoded(serving, other, rules, found)


def _body_decoded(serving: bytes, other: bytes, rules: Rules, found: Found) -> None:
    """The full path: both bodies decoded, prepared and walked. Two bodies that are not JSON are
    compared by their bytes: both are in hand, so no digest need stand for them."""
    a, b = _parse(serving), _parse(other)
    if a is _NOT_JSON or b is _NOT_JSON:
        found.add("body", (), "changed" if a is b else "type")
        return
    mark = found.mark()
    try:
        if rules.trie is not None:
            a, b = prepare(a, rules.trie), prepare(b, rules.trie)
        exact = no_booleans(serving) and no_booleans(other)
        walk(a, b, found, tolerance=rules.tolerance, instants=rules.instants, exact=exact)
    except RecursionError:
        # Nesting deeper than the interpreter's stack allows: the bytes differ, and saying so
        # at the root never calls two different answers equal.
        found.reset(mark)
        found.add("body", (), "changed")


def _parse(body: bytes) -> Any:
    try:
        return _DECODE.decode(body)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return _NOT_JSON


__all__ = [
    "COUNT_CAP",
    "PLAIN_NAME",
    "Answer",
    "Diff",
    "Difference",
    "Kind",
    "Part",
    "Rules",
    "compare",
    "compile_rules",
]
