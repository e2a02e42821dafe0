"""The descent through two prepared documents: ``==`` in C first, Python only where they differ.

``==`` alone is not JSON equality: Python has ``True == 1`` and ``[True] == [1]``. So whatever
``==`` calls equal is confirmed by byte-equal orjson encodings before being skipped (one
encoding of all the equal children of a node at once, one by one only when that fails), and
what fails is walked down to its leaves. Tolerance and instants apply at differing leaves only.

Booleans are the only JSON values ``==`` confuses with others (``1 == 1.0`` is one JSON number,
and the leaves call them equal too). When neither document holds a boolean (``exact``: the
caller knows it from the bodies' bytes, :func:`no_booleans`), ``==`` is trusted as it is and
nothing is encoded: on a 5 MB page that is a third of the comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import compress, repeat
from operator import eq, not_
from typing import Any

import orjson

from shadow.diff import Found, Segment
from shadow.instants import same_instant
from shadow.normalize import WHOLE, Unordered, ranked, sort_by, whole

_ABSENT: Any = object()
"""Stands for a member or element one side does not have; equal to nothing else."""
_ROOT: Any = object()
"""The segment of the document itself, which adds nothing to a path."""

_KINDS: dict[type, str] = {
    dict: "object",
    list: "array",
    Unordered: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def walk(
    a: Any, b: Any, found: Found, *, tolerance: float, instants: bool, exact: bool = False
) -> None:
    """Add to ``found`` where document ``b`` differs from ``a`` (both prepared). ``exact``:
    neither document holds a boolean, so ``==`` is JSON equality."""
    if exact:
        if a == b:
            return
    # Most comparisons find equal documents: the encodings alone say so, with no ``==``.
    elif _encoded_equal(a, b):
        return
    _Walk(found, tolerance, instants, exact).children([_ROOT], [a], [b], [])


def walk_at(
    a: Any,
    b: Any,
    found: Found,
    path: Sequence[Segment],
    *,
    tolerance: float,
    instants: bool,
    exact: bool = False,
) -> None:
    """:func:`walk` for two values (prepared) found at ``path`` in their documents."""
    _Walk(found, tolerance, instants, exact).children([_ROOT], [a], [b], list(path))


def no_booleans(body: bytes) -> bool:
    """Whether a JSON body certainly holds no boolean: a ``true`` or ``false`` literal is
    always spelled out in the bytes (no escape stands for it). A string holding the word only
    makes this say False, the safe side."""
    return b"true" not in body and b"false" not in body


def _encoded_equal(a: Any, b: Any) -> bool:
    """True only when the values are certainly equal; False may still be equal (1 and 1.0)."""
    try:
        return orjson.dumps(a) == orjson.dumps(b)
    except orjson.JSONEncodeError:  # integers beyond 64 bits, nesting beyond 255: walk them
        return False


def _verified(a: Any, b: Any) -> bool:
    """Whether values ``==`` calls equal are equal as JSON (no ``true`` standing for ``1``)."""
    try:
        if orjson.dumps(a) == orjson.dumps(b):
            return True
        # Same members in another order: still equal.
        return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
            b, option=orjson.OPT_SORT_KEYS
        )
    except orjson.JSONEncodeError:  # integers beyond 64 bits, nesting beyond 255
        return _strictly_equal(a, b)


def _strictly_equal(a: Any, b: Any) -> bool:
    ka, kb = _KINDS.get(type(a)), _KINDS.get(type(b))
    if ka != kb:
        return False
    if ka == "object":
        return a.keys() == b.keys() and all(_strictly_equal(v, b[k]) for k, v in a.items())
    if ka == "array":
        return len(a) == len(b) and all(map(_strictly_equal, a, b))
    return bool(a == b)


class _Walk:
    def __init__(self, found: Found, tolerance: float, instants: bool, exact: bool) -> None:
        self.found = found
        self.tolerance = tolerance
        self.instants = instants
        self.exact = exact

    def value(self, a: Any, b: Any, path: list[Segment]) -> None:
        ta, tb = type(a), type(b)
        if ta is dict and tb is dict:
            self.object(a, b, path)
        elif ta is Unordered and tb is Unordered:
            self.unordered(a, b, path)
        elif (ta is list or ta is Unordered) and (tb is list or tb is Unordered):
            n = max(len(a), len(b))
            xs = a if len(a) == n else [*a, *[_ABSENT] * (n - len(a))]
            ys = b if len(b) == n else [*b, *[_ABSENT] * (n - len(b))]
            self.children(range(n), xs, ys, path)
        else:
            self.leaf(a, b, path)

    def object(self, a: dict[str, Any], b: dict[str, Any], path: list[Segment]) -> None:
        names = sorted(a.keys() | b.keys()) if a.keys() != b.keys() else sorted(a)
        absent = repeat(_ABSENT)
        self.children(names, list(map(a.get, names, absent)), list(map(b.get, names, absent)), path)

    def unordered(self, a: Unordered, b: Unordered, path: list[Segment]) -> None:
        if a.mode != b.mode:
            a, b = _reconciled(a, b)
        if a.keys == b.keys:
            self.children(range(len(a)), a, b, path)
        elif a.mode != WHOLE:
            # Keys are unique on each side: the union, sorted, gives every element its position.
            in_a, in_b = dict(zip(a.keys, a, strict=True)), dict(zip(b.keys, b, strict=True))
            union = sorted(in_a.keys() | in_b.keys())
            absent = repeat(_ABSENT)
            xs, ys = list(map(in_a.get, union, absent)), list(map(in_b.get, union, absent))
            self.children(range(len(union)), xs, ys, path)
        else:
            self.children(*_multiset_union(a, b), path)

    def children(
        self, segments: Sequence[Segment], xs: list[Any], ys: list[Any], path: list[Segment]
    ) -> None:
        """Report or descend into each pair of children that differs, in order."""
        equal = list(map(eq, xs, ys))
        differing = list(compress(range(len(equal)), map(not_, equal)))
        if (
            not self.exact
            and len(differing) < len(equal)
            and not _verified(list(compress(xs, equal)), list(compress(ys, equal)))
        ):
            same = compress(range(len(equal)), equal)
            differing += [n for n in same if not _verified(xs[n], ys[n])]
            differing.sort()
        for n in differing:
            x, y = xs[n], ys[n]
            segment = segments[n]
            if segment is not _ROOT:
                path.append(segment)
            if y is _ABSENT:
                self.found.add("body", path, "missing")
            elif x is _ABSENT:
                self.found.add("body", path, "extra")
            else:
                self.value(x, y, path)
            if segment is not _ROOT:
                path.pop()

    def leaf(self, a: Any, b: Any, path: list[Segment]) -> None:
        kind = _KINDS[type(a)]
        if kind != _KINDS[type(b)]:
            self.found.add("body", path, "type")
        elif kind == "number":
            if not (a == b or (self.tolerance and _within(a, b, self.tolerance))):
                self.found.add("body", path, "changed")
        elif kind == "string":
            if a != b and not (self.instants and same_instant(a, b)):
                self.found.add("body", path, "changed")
        elif kind == "boolean" and a is not b:
            self.found.add("body", path, "changed")


def _multiset_union(a: Unordered, b: Unordered) -> tuple[list[int], list[Any], list[Any]]:
    """The unmatched elements, by position in the merged multiset of whole elements."""
    ka, kb = a.keys, b.keys
    na, nb = len(a), len(b)
    i = j = position = 0
    positions: list[int] = []
    xs: list[Any] = []
    ys: list[Any] = []
    while i < na or j < nb:
        if j == nb or (i < na and ka[i] < kb[j]):
            positions.append(position)
            xs.append(a[i])
            ys.append(_ABSENT)
            i += 1
        elif i == na or kb[j] < ka[i]:
            positions.append(position)
            xs.append(_ABSENT)
            ys.append(b[j])
            j += 1
        else:  # equal serializations: equal elements
            i += 1
            j += 1
        position += 1
    return positions, xs, ys


def _within(a: int | float, b: int | float, tolerance: float) -> bool:
    try:
        return abs(a - b) <= tolerance
    except OverflowError:  # an integer too large for a float is far from anything else
        return False


def _reconciled(a: Unordered, b: Unordered) -> tuple[Unordered, Unordered]:
    """Both arrays keyed alike: by ranked keys when their key types differ, else as wholes."""
    if a.mode == WHOLE or b.mode == WHOLE:
        return _as_whole(a), _as_whole(b)
    return _as_ranked(a), _as_ranked(b)


def _as_whole(items: Unordered) -> Unordered:
    return items if items.mode == WHOLE else whole(list(items))


def _as_ranked(items: Unordered) -> Unordered:
    if items.mode == "ranked":
        return items
    return sort_by(list(items), [ranked(k) for k in items.keys], "ranked")
