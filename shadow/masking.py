"""Two JSON bodies equal but for the values their rules ignore, told without decoding them.

The commonest comparison is a page served twice: the same records, and a ``served_at`` (of the
page, of each record) that the rules ignore and that alone changed. The full path decodes both
bodies, prepares and walks them (:func:`shadow.compare._body_decoded`); this module settles that
case with a skipping decode of one body, one ``split``, one ``join`` and one ``==``:

1. The serving body is decoded with a msgspec type built from the rules' trie, which skips
   everything but the ignored values and hands those over as ``msgspec.Raw`` (:class:`Plan`).
2. The body is cut at its ignored values, by value (:func:`_pieces`). That is exact when each
   value occurs in the body exactly as often as it was found ignored, and cannot overlap itself
   (:func:`_maskable`: a number, a literal, or a string without escapes whose ends are no JSON
   punctuation): the occurrences are then the ignored values and nothing else.
3. The other body is equal but for ignored values when it is the same pieces joined by one
   scalar, found where the first ignored value stood (:func:`_one_value`). A serving body whose
   ignored values are not all one value goes the full path.

Only identical bytes between ignored values are taken as equal. Bodies that are equal JSON in
other bytes (whitespace, member order, ``1`` and ``1.0``, escapes, instants, tolerance, an
unordered array in another order) are not recognised here: :func:`equal_but_ignored` returns
False and the full path decides, as it does for every body that differs.

The skipping decoder accepts what msgspec's full decoder refuses (invalid UTF-8 inside a string,
a number out of range), and the full path gives up on documents nested deeper than the
interpreter's stack ("changed" at the root): :func:`_readable` and :func:`_shallow` make sure the
full path would have read and walked the serving body, so that True here is always what the
full path would have found.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from functools import reduce
from operator import attrgetter, or_
from typing import Any

import msgspec
from msgspec import UNSET, Raw, UnsetType

from shadow.pointers import Node

_DECODE = msgspec.json.Decoder()
_SCALARS: tuple[Any, ...] = (str, int, float, bool, type(None))

MAX_DISTINCT = 1
"""Distinct ignored values a serving body may hold: one (a page's time stamp, repeated in its
records). With a few, cutting the body by each cost twice what decoding it does (measured on a
4.5 MB page with 2 to 8 stamps); those, like a request id per record, go the full path."""
MAX_DEPTH = 200
"""Nesting this module answers for: within orjson's 255 levels and well within the interpreter's
stack, so that the full path never gives up where this module calls two bodies equal."""

Collect = Callable[[Any, list[Raw]], None]
"""Adds the ignored values found in a decoded value to a list."""


def equal_but_ignored(serving: bytes, other: bytes, plan: Plan) -> bool:
    """Whether body ``other`` is body ``serving`` with only ignored values changed (into
    scalars): then the full path would find no difference between them. False when it is not
    so, or when that cannot be told this way."""
    if plan.mask is None or not _same_start(serving, other, plan.names):
        return False
    values = plan.ignored(serving)
    if not values:
        return False
    first = values[0]
    if values.count(first) != len(values):
        return False  # several distinct values: cutting by each costs more than decoding
    return _one_value(serving, other, bytes(first), len(values), plan.mask_depth)


PROBE = 64 * 1024
"""How far into a body :func:`_same_start` looks for an ignored member's name."""


def _same_start(serving: bytes, other: bytes, names: tuple[bytes, ...] | None) -> bool:
    """False when the bodies certainly differ before their first ignored value: what decides
    most bodies that differ, before any decoding. Looks for the first ignored member's name in
    the first :data:`PROBE` bytes; True when it cannot tell."""
    if not names:
        return True
    found = [at for at in (serving.find(name, 0, PROBE) for name in names) if at >= 0]
    return not found or other.startswith(memoryview(serving)[: min(found)])


_TOKEN_AT = re.compile(rb'"[^"\\]*"|[^,\]}\s]+')


def _one_value(serving: bytes, other: bytes, value: bytes, times: int, depth: int) -> bool:
    """``serving`` holds ``times`` ignored values, all ``value``: is ``other`` the same body with
    each of them replaced by one scalar?"""
    if not _maskable(value):
        return False
    # The scalar ``other`` holds where ``serving`` first holds the value: if ``serving`` holds it
    # elsewhere than where ignored, the cut below fails. Lengths tell most other bodies apart
    # before any cut.
    at = serving.find(value)
    found = _TOKEN_AT.match(other, at)
    if found is None:
        return False
    scalar = found.group()
    if len(other) != len(serving) + times * (len(scalar) - len(value)):
        return False
    pieces = serving.split(value)
    if len(pieces) != times + 1 or other != scalar.join(pieces):
        return False
    try:
        kind = type(_DECODE.decode(scalar))
    except (msgspec.DecodeError, ValueError, RecursionError):
        return False
    return kind in _SCALARS and _readable(serving) and _shallow(serving, pieces, depth)


_STRING_HEAD = frozenset(b":,]} \t\n\r")
_STRING_TAIL = frozenset(b":[{, \t\n\r")
_TOKEN = frozenset(b"0123456789+-.eE")


def _maskable(value: bytes) -> bool:
    """Whether no occurrence of ``value`` in JSON text can overlap ``value`` as a JSON value
    without being it: true of a number, a literal, and a string without escapes whose content
    neither begins with what may follow a value nor ends with what may precede one (an
    occurrence straddling a string value's end would have to)."""
    if value[:1] == b'"':
        if b"\\" in value:
            return False
        return len(value) == 2 or (value[1] not in _STRING_HEAD and value[-2] not in _STRING_TAIL)
    return value in (b"true", b"false", b"null") or _TOKEN.issuperset(value)


# --- what the full path reads and walks ----------------------------------------------------


def _table(classes: dict[bytes, bytes], default: bytes) -> bytes:
    table = bytearray(default * 256)
    for members, name in classes.items():
        for c in members:
            table[c] = name[0]
    return bytes(table)


_NUMBERS = _table({b"0123456789": b"0", b"eE": b"e", b"+-": b"s", b",]} \t\n\r": b","}, b"x")
"""The skeleton of numbers: digits, exponent mark, sign and what may end a number."""
_LONG_NUMBER = b"0" * 200
_BIG_EXPONENT = re.compile(rb"es?000+(?:,|\Z)")
_QUOTES_AND_BRACKETS = bytes(c for c in range(256) if c not in b'"[]{}')
_OPEN_CLOSE = bytes.maketrans(b"{}", b"[]")
_BRACKETS = bytes.maketrans(b"[]", b"||")


def _readable(body: bytes) -> bool:
    """Whether msgspec's full decoder reads every string and number that its skipping decoder
    passed over in ``body`` (JSON text): valid UTF-8, no number out of range. False may be
    wrong, True is not."""
    if not body.isascii():
        try:
            body.decode()
        except UnicodeDecodeError:
            return False
    # A number out of range has 200 digits or more, or an exponent of 3 digits or more. In the
    # skeleton a sign stands only before a number or its exponent's digits (never inside a run
    # of digits), and a number in JSON text ends with "," (a comma, a bracket or a space
    # follows it) or at the end; a hexadecimal identifier such as "a1e234f" in a string does
    # not. (Mapping signs rather than deleting them: a translation that deletes costs twice.)
    numbers = body.translate(_NUMBERS)
    return _LONG_NUMBER not in numbers and _BIG_EXPONENT.search(numbers) is None


def _shallow(body: bytes, pieces: list[bytes], mask_depth: int) -> bool:
    """Whether ``body`` (JSON text) nests at most :data:`MAX_DEPTH` deep. False may be wrong.

    ``pieces`` is ``body`` cut at ignored values, none in more than ``mask_depth`` containers.
    Each character opens or closes at most one container, so no value lies deeper than
    ``mask_depth`` plus half the longest piece: when ignored values come often enough (one per
    record), that settles it without looking at the structure."""
    if len(pieces) > 1 and mask_depth + (max(map(len, pieces)) + 1) // 2 <= MAX_DEPTH:
        return True
    return _depth(body) <= MAX_DEPTH


def _depth(body: bytes) -> int:
    """How deeply ``body`` (JSON text) nests; ``MAX_DEPTH + 1`` when deeper or unsure."""
    if b"\\" in body:  # an escaped quote is no quote; an escaped backslash escapes nothing
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    shape = body.translate(_OPEN_CLOSE, _QUOTES_AND_BRACKETS)  # quotes, "[" and "]" only
    # Between two brackets lie whole strings, an even number of quotes, unless a string holds a
    # bracket: then the brackets inside strings must go first.
    if any(n % 2 for n in set(map(len, shape.translate(_BRACKETS).split(b"|")))):
        shape = shape.replace(b'""', b"")  # keeps every other character in or out of strings
        shape = b"".join(shape.split(b'"')[::2])
    else:
        shape = shape.translate(None, b'"')
    depth = 0
    while shape:
        inner = shape.replace(b"[]", b"")
        if len(inner) == len(shape) or depth == MAX_DEPTH:
            return MAX_DEPTH + 1
        shape, depth = inner, depth + 1
    return depth


# --- the decoder of ignored values -----------------------------------------------------------


class Plan:
    """The decoder of a set of rules' ignored values, built once with the rules."""

    def __init__(self, trie: Node | None) -> None:
        self.mask: tuple[msgspec.json.Decoder[Any], Collect] | None = None
        self.mask_depth = 0
        """How many containers hold an ignored value, at most."""
        self.names: tuple[bytes, ...] | None = None
        """The names of ignored members as JSON spells them, when every ignored value is a
        member's value by name (not an array element, nor any member of an object)."""
        shapes = _Shapes()
        if trie is not None and shapes.captures(trie):
            kind, collect = shapes.value(trie)
            self.mask = msgspec.json.Decoder(kind), collect
            self.mask_depth = _ignored_depth(trie, 0)
            names = _ignored_names(trie, set())
            if names is not None:
                self.names = tuple(
                    sorted(json.dumps(n, ensure_ascii=False).encode() for n in names)
                )

    def ignored(self, body: bytes) -> list[Raw] | None:
        """Ignored values of ``body`` (all of them where the rules can be said as a type), or
        None when msgspec does not decode it."""
        assert self.mask is not None
        decoder, collect = self.mask
        try:
            value = decoder.decode(body)
        except (msgspec.DecodeError, ValueError, RecursionError):
            return None
        found: list[Raw] = []
        collect(value, found)
        return found


def _ignored_names(node: Node, seen: set[int]) -> set[str] | None:
    """The names of the members ``node`` and what lies under it ignore; None when it ignores
    array elements or members whatever their names."""
    if id(node) in seen:
        return set()
    seen.add(id(node))
    if (node.wildcard is not None and node.wildcard.ignore) or any(
        c.ignore for c in node.indexes.values()
    ):
        return None
    names = {name for name, child in node.members.items() if child.ignore}
    for child in [*node.members.values(), *node.indexes.values(), node.wildcard]:
        if child is not None and not child.ignore:
            below = _ignored_names(child, seen)
            if below is None:
                return None
            names |= below
    return names


def _ignored_depth(node: Node, depth: int) -> int:
    if node.ignore:
        return depth
    children = [*node.members.values(), *node.indexes.values()]
    if node.wildcard is not None:
        children.append(node.wildcard)
    return max((_ignored_depth(c, depth + 1) for c in children), default=0)


_UNNAMEABLE = re.compile(r'[\\"\x00-\x1f]')


def _union(*types: Any) -> Any:
    """``types[0] | types[1] | ...``: msgspec decodes a value as whichever fits."""
    return reduce(or_, types)


def _skip(value: Any, found: list[Raw]) -> None:
    pass


def _append(value: Any, found: list[Raw]) -> None:
    found.append(value)


def _extend(value: list[Raw], found: list[Raw]) -> None:
    found.extend(value)


def _extend_values(value: dict[str, Raw], found: list[Raw]) -> None:
    found.extend(value.values())


def _each(collect: Collect, items: Callable[[Any], Iterable[Any]]) -> Collect:
    def collect_each(value: Any, found: list[Raw]) -> None:
        for item in items(value):
            collect(item, found)

    return collect_each


class _Shapes:
    """The msgspec types that decode the values at each node, its ignored values as ``Raw``.

    A value at a node may be an object, an array or a scalar, so each node gets a union of one
    object type, one array type and the scalars, as :func:`shadow.normalize.prepare` applies a
    node to whatever it finds. The object type is a Struct of the node's literal members
    (msgspec skips any other member) or, under a wildcard, a dict; the array type is a list
    under a wildcard. Where the rules cannot be said as a type (literal members beside a
    wildcard, array indexes, a member name msgspec will not match), nothing is captured: fewer
    values cut out only means fewer bodies found equal here.
    """

    def __init__(self) -> None:
        self._shapes: dict[int, tuple[Any, Collect]] = {}
        self._captures: dict[int, bool] = {}
        self._structs = 0

    def captures(self, node: Node) -> bool:
        """Whether ``node`` or anything under it is ignored."""
        found = self._captures.get(id(node))
        if found is None:
            children = [*node.members.values(), *node.indexes.values()]
            if node.wildcard is not None:
                children.append(node.wildcard)
            found = node.ignore or any(self.captures(c) for c in children)
            self._captures[id(node)] = found
        return found

    def value(self, node: Node) -> tuple[Any, Collect]:
        """The type of the values at ``node`` (not itself ignored) and their collector."""
        shape = self._shapes.get(id(node))
        if shape is None:
            shape = self._shapes[id(node)] = self._union(node)
        return shape

    def _child(self, node: Node) -> tuple[Any, Collect] | None:
        if node.ignore:
            return Raw, _append
        return self.value(node) if self.captures(node) else None

    def _union(self, node: Node) -> tuple[Any, Collect]:
        object_type, object_class, collect_object = self._object(node)
        element_type, collect_array = self._array(node)

        def collect(value: Any, found: list[Raw]) -> None:
            kind = type(value)
            if kind is object_class:
                collect_object(value, found)
            elif kind is list:
                collect_array(value, found)

        flat = getattr(collect_object, "flat", None)
        if flat is not None:
            collect.flat = flat  # type: ignore[attr-defined]
        array_type = list.__class_getitem__(element_type)
        return _union(object_type, array_type, *_SCALARS), collect

    def _object(self, node: Node) -> tuple[Any, type, Collect]:
        wildcard = node.wildcard
        if wildcard is None and node.members:
            fields = []
            for name, child in node.members.items():
                shape = self._child(child)
                # msgspec refuses to match a field to a name with a backslash, a quote or a
                # control character.
                if shape is not None and _UNNAMEABLE.search(name) is None:
                    fields.append((name, shape))
            return self._struct(fields)
        if wildcard is not None and not node.members:
            shape = self._child(wildcard)
            if shape is not None:
                kind, collect = shape
                if collect is _append:
                    return dict[str, Raw], dict, _extend_values
                return dict[str, kind], dict, _each(collect, dict.values)  # type: ignore[valid-type]
        return self._struct([])

    def _struct(self, fields: list[tuple[str, tuple[Any, Collect]]]) -> tuple[Any, type, Collect]:
        self._structs += 1
        names = [f"f{n}" for n in range(len(fields))]
        struct = msgspec.defstruct(
            f"Masked{self._structs}",
            [
                (name, _union(kind, UnsetType), UNSET)
                for name, (_, (kind, _)) in zip(names, fields, strict=True)
            ],
            rename={name: member for name, (member, _) in zip(names, fields, strict=True)},
            gc=False,
        )
        if not fields:
            return struct, struct, _skip
        plan = [(name, collect) for name, (_, (_, collect)) in zip(names, fields, strict=True)]

        def collect_struct(value: Any, found: list[Raw]) -> None:
            for name, collect in plan:
                member = getattr(value, name)
                if member is not UNSET:
                    collect(member, found)

        if all(collect is _append for _, collect in plan):
            collect_struct.flat = [attrgetter(name) for name in names]  # type: ignore[attr-defined]
        return struct, struct, collect_struct

    def _array(self, node: Node) -> tuple[Any, Collect]:
        wildcard = node.wildcard
        shape = None if wildcard is None or node.indexes else self._child(wildcard)
        if shape is None:
            return Raw, _skip
        kind, collect = shape
        if collect is _append:
            return Raw, _extend
        getters = getattr(collect, "flat", None)
        if getters is not None:
            return kind, _flat(getters, collect)
        return kind, _each(collect, iter)


def _flat(getters: list[attrgetter[Any]], collect: Collect) -> Collect:
    """A list's collector when its objects' ignored members are all it captures: member by
    member across the list, in C, rather than element by element."""

    def collect_flat(value: list[Any], found: list[Raw]) -> None:
        start = len(found)
        for get in getters:
            try:
                members = list(map(get, value))
            except AttributeError:  # an element that is not an object: one by one
                del found[start:]
                for element in value:
                    collect(element, found)
                return
            if UNSET in members:
                members = [m for m in members if m is not UNSET]
            found.extend(members)

    return collect_flat


__all__ = ["MAX_DEPTH", "MAX_DISTINCT", "Plan", "equal_but_ignored"]
