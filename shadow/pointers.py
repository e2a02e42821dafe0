"""JSON pointers (RFC 6901) and the pointer patterns of comparison rules, compiled into a trie.

A pattern is a pointer whose segment ``*`` matches exactly one segment: any member name or any
array index (a member literally named ``*`` is matched by it like any other). A literal segment
matches the member of that name, and in an array the index it spells in canonical decimal
(``3``, not ``03``). Patterns are matched against raw paths, before member names are tokenized.

Several patterns may match one path (``/a/*`` and ``/*/b`` both match ``/a/b``), so the trie is
determinized once at compile time: each path of a document then leads to exactly one node, and
applying the rules costs one dictionary lookup per segment, however many patterns there are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

WILDCARD = "*"
_INDEX = re.compile(r"0|[1-9][0-9]*")


def parse_pointer(text: str) -> tuple[str, ...]:
    """The unescaped segments of ``text``; ``""`` is the whole document. ValueError if invalid."""
    if text == "":
        return ()
    if not text.startswith("/"):
        raise ValueError(f"{text!r} is not a JSON pointer (it must start with '/')")
    segments = []
    for raw in text[1:].split("/"):
        if re.search(r"~(?![01])", raw):
            raise ValueError(f"{text!r}: '~' must be followed by 0 or 1 (RFC 6901)")
        # ~1 first: "~01" is "~1" unescaped once, not "/".
        segments.append(raw.replace("~1", "/").replace("~0", "~"))
    return tuple(segments)


def escape(segment: str) -> str:
    return segment.replace("~", "~0").replace("/", "~1")


def array_index(segment: str) -> int | None:
    """The array index a literal segment names, or None (RFC 6901 allows no leading zeros)."""
    return int(segment) if _INDEX.fullmatch(segment) else None


@dataclass(eq=False)
class Node:
    """Where a path stands among the patterns: what applies here, and where each next step leads."""

    ignore: bool = False
    """The value here is never compared."""
    unordered: str | None = None
    """The array here is matched by this key field of its elements."""
    members: dict[str, Node] = field(default_factory=dict)
    """Next node by literal member name; any other name goes to ``wildcard``."""
    indexes: dict[int, Node] = field(default_factory=dict)
    """Next node by array index, for literal segments that spell one."""
    wildcard: Node | None = None
    drops: tuple[str, ...] | None = None
    """Set when all this node does is drop these members from an object: the common
    ``/records/*/served_at`` shape, applied to every element of a large array in a tight loop."""

    def member(self, name: str) -> Node | None:
        return self.members.get(name, self.wildcard)

    def index(self, i: int) -> Node | None:
        return self.indexes.get(i, self.wildcard)


@dataclass(eq=False)
class _Pattern:
    """A node of the non-deterministic trie: patterns as written, one branch per wildcard."""

    ignore: bool = False
    unordered: tuple[tuple[int, str], str] | None = None
    """(specificity, key field): (wildcard count, pattern text), the least wins."""
    literal: dict[str, _Pattern] = field(default_factory=dict)
    wildcard: _Pattern | None = None

    def child(self, segment: str) -> _Pattern:
        if segment == WILDCARD:
            if self.wildcard is None:
                self.wildcard = _Pattern()
            return self.wildcard
        return self.literal.setdefault(segment, _Pattern())


def compile_patterns(ignore: Iterable[str], unordered: Mapping[str, str]) -> Node | None:
    """The deterministic trie of these patterns, or None when there are none to apply.

    A pattern covering a whole document (the root ``""``, or only wildcards: ``/*``) is not
    honoured as an ignore: such a rule would turn every comparison into a match, which is
    exactly what the gate must never be shown. The configuration refuses them already.
    """
    root = _Pattern()
    empty = True
    for text in ignore:
        segments = parse_pointer(text)
        if all(s == WILDCARD for s in segments):
            continue
        node = root
        for segment in segments:
            node = node.child(segment)
        node.ignore = True
        empty = False
    for text, key in unordered.items():
        segments = parse_pointer(text)
        node = root
        for segment in segments:
            node = node.child(segment)
        rank = (segments.count(WILDCARD), text)
        if node.unordered is None or rank < node.unordered[0]:
            node.unordered = (rank, key)
        empty = False
    return None if empty else _determinize(frozenset({root}), {})


def _determinize(states: frozenset[_Pattern], memo: dict[frozenset[_Pattern], Node]) -> Node:
    if states in memo:
        return memo[states]
    node = Node()
    memo[states] = node
    if any(s.ignore for s in states):
        node.ignore = True
        return node  # nothing under an ignored value matters
    ranked = [s.unordered for s in states if s.unordered is not None]
    if ranked:
        node.unordered = min(ranked)[1]
    wild = frozenset(s.wildcard for s in states if s.wildcard is not None)
    for name in sorted({name for s in states for name in s.literal}):
        target = frozenset(s.literal[name] for s in states if name in s.literal) | wild
        child = _determinize(target, memo)
        node.members[name] = child
        index = array_index(name)
        if index is not None:
            node.indexes[index] = child
    if wild:
        node.wildcard = _determinize(wild, memo)
    if (
        node.unordered is None
        and node.wildcard is None
        and node.members
        and all(c.ignore for c in node.members.values())
        and not node.indexes
    ):
        node.drops = tuple(node.members)
    return node
