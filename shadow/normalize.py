"""A parsed answer made ready for comparison: ignored values dropped, unordered arrays sorted.

This runs once per side before any comparison and only along the rules' patterns, so that the
comparison itself can test whole subtrees with C-speed ``==`` and descend only where they
differ.

- An ignored object member is removed: neither its value nor its presence is compared.
- An ignored array element is replaced by ``null`` on both sides: removing it would shift the
  elements after it, so its value is not compared but the array's length still is.
- An unordered array becomes an :class:`Unordered` list sorted by its key field. When an element
  is not an object, lacks the key field, or two elements share a key (JSON-equal keys, so ``1``
  and ``1.0`` are one key; ``true`` and ``1`` are two), keys cannot say which element is which:
  the array is then compared as a multiset of whole elements, sorted by a canonical
  serialization (:data:`WHOLE`). Tolerance and instants do not apply inside such elements, so
  that fallback errs towards reporting a difference, never towards hiding one.
- Indexes in patterns under an unordered array name positions as served, before sorting.
"""

from __future__ import annotations

import json
from itertools import islice
from operator import itemgetter, lt
from typing import Any, Literal

from shadow.pointers import Node

Mode = Literal["number", "string", "ranked", "whole"]
WHOLE: Mode = "whole"


class Unordered(list[Any]):
    """An array sorted by its elements' keys; ``keys[i]`` is the key of element ``i``.

    A list subclass, so ``==`` and orjson treat it as the array it is. Keys sort within their
    mode: numbers, strings, ``ranked`` (mixed JSON types, as (type rank, value)) or ``whole``
    (canonical serializations, duplicates allowed).
    """

    __slots__ = ("keys", "mode")
    keys: list[Any]
    mode: Mode


def prepare(value: Any, node: Node) -> Any:
    """``value`` with ``node``'s rules applied, in place where it can be: use the result."""
    kind = type(value)
    if kind is dict:
        _object(value, node)
    elif kind is list:
        _array(value, node)
        if node.unordered is not None:
            return by_key(value, node.unordered)
    return value


def _object(value: dict[str, Any], node: Node) -> None:
    wildcard = node.wildcard
    if wildcard is None:
        for name, child in node.members.items():
            if name in value:
                if child.ignore:
                    del value[name]
                else:
                    value[name] = prepare(value[name], child)
        return
    if wildcard.ignore and not node.members:
        value.clear()
        return
    for name in list(value):
        child = node.members.get(name, wildcard)
        if child.ignore:
            del value[name]
        else:
            value[name] = prepare(value[name], child)


def _array(value: list[Any], node: Node) -> None:
    wildcard = node.wildcard
    if wildcard is None:
        for i, child in node.indexes.items():
            if i < len(value):
                value[i] = None if child.ignore else prepare(value[i], child)
        return
    drops = wildcard.drops
    if drops is not None and not node.indexes:
        # Members exist only in objects: any other element has nothing to drop.
        if len(drops) == 1:
            (name,) = drops
            for element in value:
                if type(element) is dict:
                    element.pop(name, None)
        else:
            for element in value:
                if type(element) is dict:
                    for name in drops:
                        element.pop(name, None)
        return
    for i, element in enumerate(value):
        child = node.indexes.get(i, wildcard)
        value[i] = None if child.ignore else prepare(element, child)


def by_key(items: list[Any], key: str) -> Unordered:
    """``items`` sorted by ``key``, or as a multiset of whole elements when keys cannot be used."""
    try:
        keys = list(map(itemgetter(key), items))
    except (KeyError, TypeError):  # not an object (TypeError), or no key field
        return whole(items)
    kinds = set(map(type, keys))
    mode: Mode
    if kinds <= {int, float}:
        mode = "number"
    elif kinds == {str}:
        mode = "string"
    else:
        mode, keys = "ranked", [ranked(k) for k in keys]
    if all(map(lt, keys, islice(keys, 1, None))):
        # Served in key order, as pages usually are: strictly ascending, so unique too.
        result = Unordered(items)
        result.keys, result.mode = keys, mode
        return result
    if len(set(keys)) != len(keys):
        return whole(items)
    return sort_by(items, keys, mode)


def whole(items: list[Any]) -> Unordered:
    return sort_by(items, [canonical(element) for element in items], WHOLE)


def sort_by(items: list[Any], keys: list[Any], mode: Mode) -> Unordered:
    """``items`` in the order of their ``keys`` (``keys[i]`` is the key of ``items[i]``)."""
    order = sorted(range(len(items)), key=keys.__getitem__)
    result = Unordered([items[i] for i in order])
    result.keys = [keys[i] for i in order]
    result.mode = mode
    return result


def ranked(key: Any) -> tuple[int, Any]:
    """A key comparable with keys of any JSON type, equal only for JSON-equal keys.

    Python's ``True == 1`` would merge a boolean key with a numeric one: the rank keeps them
    apart, while ``1`` and ``1.0`` (one JSON number) stay one key.
    """
    if key is None:
        return (0, 0)
    kind = type(key)
    if kind is bool:
        return (1, int(key))
    if kind is int or kind is float:
        return (2, key)
    if kind is str:
        return (3, key)
    return (4, canonical(key))


def canonical(value: Any) -> str:
    """One spelling per JSON value: sorted keys, integral floats as integers.

    The standard library's encoder rather than orjson's: it writes integers of any size.
    """
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _plain(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: _plain(v) for k, v in value.items()}
    if kind is list or kind is Unordered:
        return [_plain(v) for v in value]
    if kind is float and value.is_integer():
        return int(value)
    return value
