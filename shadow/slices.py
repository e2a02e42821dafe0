"""Two large JSON bodies compared slice by slice: decoded only where their bytes differ.

Byte-equal JSON texts are equal under any rules. So two large answers that differ in a few
records need not both be decoded in full (on a 5 MB page, decoding both and freeing them is
most of the comparison's cost): each is cut into the slices of its members or elements
(``msgspec.Raw``, views of the body, one skipping parse), slices equal in bytes are passed over,
and only the pairs that differ are cut again or, once small, decoded, prepared and walked as the
full path walks them (:func:`shadow.walk.walk_at`), at the same pointers and in the same order.

- An object is cut into its members: names in order, ignored names passed over, a member on one
  side only ``missing`` or ``extra``, as the walk reports them.
- An array is cut into its elements, paired by position.
- An unordered array is cut into its elements, paired by key: the keys are read with a second
  skipping parse that decodes only the key field of each element. Each element keeps the
  position of its key in the sorted union of both sides' keys, as :mod:`shadow.normalize` ranks
  it. Where keys cannot pair elements the way :func:`shadow.normalize.by_key` would (an element
  that is not an object or lacks the key, keys not all numbers or all strings, a key repeated,
  the two sides keyed differently, rules that drop the key or name positions), the array is
  decoded and walked whole: the full path decides.

Ignored values would make every slice differ (a ``served_at`` in each record, another in each
answer), so each body first has them replaced by ``null`` where :mod:`shadow.masking` can find
them by value: that changes nothing the rules compare (an ignored member is dropped, an ignored
element nulled, whatever its value). Where they cannot be found so, the slices holding them
differ and are decoded, which the rules then settle: slower, never wrong.

The skipping parses accept what msgspec's full decoder refuses (invalid UTF-8, a number out of
range), and the full path gives up on nesting deeper than the interpreter's stack: as in
:mod:`shadow.masking`, a body goes this way only when the full path would have read and walked
it.
"""

from __future__ import annotations

from functools import cache
from itertools import compress, repeat
from operator import attrgetter, ne
from typing import Any

import msgspec
from msgspec import UNSET, Raw

from shadow.diff import Found, Segment
from shadow.masking import (
    _UNNAMEABLE,
    MAX_DEPTH,
    Plan,
    _depth,
    _maskable,
    _readable,
    _shallow,
)
from shadow.normalize import prepare
from shadow.pointers import Node
from shadow.walk import no_booleans, walk_at

SLICE_FROM = 2048
"""Slices from this size (the larger of a pair, bytes) are cut again rather than decoded: a
record of a few hundred bytes costs less to decode than to cut."""

_VALID = msgspec.json.Decoder(Raw)
_OBJECT = msgspec.json.Decoder(dict[str, Raw])
_ARRAY = msgspec.json.Decoder(list[Raw])
_FULL = msgspec.json.Decoder()
_ABSENT: Any = object()
_SPACE = b" \t\n\r"


def compare_slices(
    serving: bytes,
    other: bytes,
    trie: Node | None,
    plan: Plan | None,
    found: Found,
    *,
    tolerance: float,
    instants: bool,
    slice_from: int = SLICE_FROM,
) -> bool:
    """Add to ``found`` where body ``other`` differs from ``serving``, as the full path would;
    False (nothing added) when these bodies must go the full path instead."""
    a, b = _ready(serving, plan), _ready(other, plan)
    if a is None or b is None:
        return False
    mark = found.mark()
    try:
        _Slices(found, tolerance, instants, slice_from).value(a, b, trie, [])
    except RecursionError:
        # Three frames a level here against the walk's two: a caller deep in its own stack
        # can leave room for the full path's descent and not for this one. It decides.
        found.reset(mark)
        return False
    return True


def _ready(body: bytes, plan: Plan | None) -> bytes | None:
    """``body`` with the ignored values :mod:`shadow.masking` finds by value replaced by
    ``null``; None unless the full path would read and walk it."""
    pieces = None
    if plan is not None and plan.mask is not None:
        values = plan.ignored(body)
        if values is None:
            return None  # not JSON as msgspec reads it
        if values:
            value = bytes(values[0])
            if values.count(values[0]) == len(values) and _maskable(value):
                cut = body.split(value)
                if len(cut) == len(values) + 1:  # found exactly where ignored
                    pieces = cut
    else:
        try:
            _VALID.decode(body)
        except (msgspec.DecodeError, ValueError, RecursionError):
            return None
    if not _readable(body):
        return None
    if pieces is None:
        return body if _depth(body) <= MAX_DEPTH else None
    if not _shallow(body, pieces, plan.mask_depth if plan is not None else 0):
        return None
    return b"null".join(pieces)


def _head(text: bytes | Raw) -> int:
    """The first byte of a JSON text that is not white space (``{``, ``[`` or a scalar's)."""
    view = memoryview(text)
    start = bytes(view[:64]).lstrip(_SPACE) or bytes(view).lstrip(_SPACE)
    return start[0] if start else 0


@cache
def _keys_of(key: str) -> msgspec.json.Decoder[Any]:
    """Decodes an array of objects into their ``key`` members alone (UNSET where absent)."""
    element = msgspec.defstruct(
        "Keyed", [("key", Any, UNSET)], rename={"key": key}, gc=False, array_like=False
    )
    return msgspec.json.Decoder(list[element])  # type: ignore[valid-type]


_KEY = attrgetter("key")


def _mode(keys: list[Any]) -> str | None:
    """The mode :func:`shadow.normalize.by_key` sorts these keys in, when it is numbers or
    strings and no key repeats; None otherwise."""
    kinds = set(map(type, keys))
    if kinds <= {int, float}:
        mode = "number"
    elif kinds == {str}:
        mode = "string"
    else:
        return None
    return mode if len(set(keys)) == len(keys) else None


def _keeps_key(element: Node | None, key: str) -> bool:
    """Whether the rules at an unordered array's elements leave their key field as served."""
    if element is None:
        return True
    if element.ignore:
        return False
    named = element.member(key)
    return named is None or not named.ignore


class _Slices:
    def __init__(self, found: Found, tolerance: float, instants: bool, slice_from: int) -> None:
        self.found = found
        self.tolerance = tolerance
        self.instants = instants
        self.slice_from = slice_from

    def value(self, x: Any, y: Any, node: Node | None, path: list[Segment]) -> None:
        """Slices ``x`` and ``y`` (bytes or Raw) at ``path``, ``node`` their rules."""
        if x == y:
            return
        if max(len(x), len(y)) >= self.slice_from:
            head = _head(x)
            if head == _head(y):
                if head == 0x7B:  # {
                    return self.object(x, y, node, path)
                if head == 0x5B:  # [
                    if node is not None and node.unordered is not None:
                        return self.unordered(x, y, node, node.unordered, path)
                    return self.array(x, y, node, path)
        self.decoded(x, y, node, path)

    def decoded(self, x: Any, y: Any, node: Node | None, path: list[Segment]) -> None:
        """The full path, for this pair of slices."""
        a, b = _FULL.decode(x), _FULL.decode(y)
        if node is not None:
            a, b = prepare(a, node), prepare(b, node)
        exact = no_booleans(bytes(x)) and no_booleans(bytes(y))
        walk_at(
            a, b, self.found, path, tolerance=self.tolerance, instants=self.instants, exact=exact
        )

    def object(
        self, x: bytes | Raw, y: bytes | Raw, node: Node | None, path: list[Segment]
    ) -> None:
        da, db = _OBJECT.decode(x), _OBJECT.decode(y)
        names = sorted(da.keys() | db.keys()) if da.keys() != db.keys() else sorted(da)
        for name in names:
            child = None if node is None else node.member(name)
            if child is not None and child.ignore:
                continue
            self.child(da.get(name, _ABSENT), db.get(name, _ABSENT), child, name, path)

    def array(self, x: bytes | Raw, y: bytes | Raw, node: Node | None, path: list[Segment]) -> None:
        xs, ys = _ARRAY.decode(x), _ARRAY.decode(y)
        n = max(len(xs), len(ys))
        xs += repeat(_ABSENT, n - len(xs))
        ys += repeat(_ABSENT, n - len(ys))
        for i in compress(range(n), map(ne, xs, ys)):
            x_i, y_i = xs[i], ys[i]
            child = None if node is None else node.index(i)
            if child is not None and child.ignore and x_i is not _ABSENT and y_i is not _ABSENT:
                continue  # nulled on both sides
            self.child(x_i, y_i, child, i, path)

    def unordered(
        self, x: bytes | Raw, y: bytes | Raw, node: Node, key: str, path: list[Segment]
    ) -> None:
        element = node.wildcard
        # msgspec matches no field to a name with a backslash, a quote or a control character
        if node.indexes or not _keeps_key(element, key) or _UNNAMEABLE.search(key):
            return self.decoded(x, y, node, path)
        keys = _keys_of(key)
        try:
            ka = list(map(_KEY, keys.decode(x)))
            kb = list(map(_KEY, keys.decode(y)))
        except msgspec.ValidationError:  # an element that is not an object
            return self.decoded(x, y, node, path)
        mode = _mode(ka)
        if mode is None or mode != _mode(kb) or UNSET in ka or UNSET in kb:
            return self.decoded(x, y, node, path)
        in_a = dict(zip(ka, _ARRAY.decode(x), strict=True))
        in_b = dict(zip(kb, _ARRAY.decode(y), strict=True))
        union = sorted(in_a.keys() | in_b.keys()) if in_a.keys() != in_b.keys() else sorted(ka)
        absent = repeat(_ABSENT)
        xs, ys = list(map(in_a.get, union, absent)), list(map(in_b.get, union, absent))
        for position in compress(range(len(union)), map(ne, xs, ys)):
            self.child(xs[position], ys[position], element, position, path)

    def child(
        self, x: Any, y: Any, node: Node | None, segment: Segment, path: list[Segment]
    ) -> None:
        if x == y:
            return
        path.append(segment)
        if y is _ABSENT:
            self.found.add("body", path, "missing")
        elif x is _ABSENT:
            self.found.add("body", path, "extra")
        else:
            self.value(x, y, node, path)
        path.pop()


__all__ = ["SLICE_FROM", "compare_slices"]
