"""Noise: what differs between two answers of the *same* side, learned as proposals, never silently.

On a sample of shadow reads the serving side is asked twice, with no write to the dataset in
between (the dispatcher checks that). Whatever differs between those two answers is not a
migration defect: a clock, a random order, a cache stamp. :func:`observe` turns such a pair
into *observations*: pointer **patterns** (array positions and tokenized member names become
``*``, so a pattern generalizes across records and carries no identifier, not even a token) and
the rule that would have hidden the difference: ``ignore``, or ``unordered`` with the key field
that names an element, for an array whose two versions hold the same elements in another order.

:class:`shadow.noise_store.NoiseStore` counts, per dataset, route template, pattern and rule,
the independent pairs it was seen in (``bascule_noise``). Once seen in the dataset's
``noise_pairs`` pairs it is a *proposal*: ``bascule noise DATASET`` lists proposals, ``bascule
noise DATASET accept|reject POINTER --reason TEXT`` decides, audited in ``bascule_audit``.
Accepted rules are added to the configured ones (:func:`merge`) by every replica: Postgres holds
them and a version bumped with every decision; the decision is announced on Redis
(``{prefix}noise``, :mod:`shadow.noise_news`) as a nudge, and replicas poll
:meth:`~shadow.noise_store.NoiseStore.version` so a lost message or a Redis outage only delays a
reload.

Never a value: patterns, rule names and field names only. A proposal never covers a whole
document: neither the root nor a pattern made only of wildcards is ever observed, recorded or
merged (the configuration refuses such ignores for the same reason).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal

import msgspec
import orjson

from bascule.config import CompareRules, Dataset
from shadow.compare import Rules
from shadow.diff import COUNT_CAP, PLAIN_NAME, Found, Kind, Part, Segment
from shadow.normalize import WHOLE, Unordered, prepare, ranked, sort_by, whole
from shadow.pointers import WILDCARD, escape, parse_pointer
from shadow.walk import walk

log = logging.getLogger("bascule.noise")

Rule = Literal["ignore", "unordered"]
Decision = Literal["accepted", "rejected"]
AcceptedRules = dict[str, tuple[tuple[str, ...], dict[str, str]]]
"""Per route template: (ignored patterns, unordered pattern -> key field)."""

DEFAULT_PAIRS = Dataset().noise_pairs
"""Pairs needed when no dataset configuration says otherwise (``[datasets.X] noise_pairs``)."""

_DECODE = msgspec.json.Decoder()
_NOT_JSON = object()
_ABSENT: Any = object()
_QUIET = 100
"""Differing elements of one array walked in a row with no new observation before the rest of
that array is skipped. Noise that is everywhere (a stamp in every element) is found in the first
elements; walking 10,000 of them made a 1 MB pair cost 270 ms for nothing new. Noise only some
later elements show is found by a later pair, or once the common noise is accepted (it is then
hidden before the walk)."""
_ANY = 0
"""The segment recorded for "some element": every position becomes ``*`` anyway."""


@dataclass(frozen=True)
class Observation:
    """One pattern seen differing in one pair, and the rule that would hide it."""

    pointer: str
    """A pattern: ``/records/*/served_at``; never ``""`` nor only wildcards."""
    rule: Rule
    key: str | None = None
    """``unordered`` only: the plain field name that identifies an element (``id`` preferred)."""


def covers_document(pattern: str) -> bool:
    """Whether a rule at ``pattern`` would apply to a whole document: the root, or only
    wildcards (``/*`` of an array, ``/*/*`` of a map of maps), or what the configuration
    refuses as such (``/``). Malformed counts as covering."""
    try:
        segments = parse_pointer(pattern)
    except ValueError:
        return True
    return all(s == WILDCARD for s in segments) or pattern.strip("/*") == ""


# -- observing a pair -------------------------------------------------------------------------


def observe(
    first: bytes, second: bytes, rules: Rules, token: Callable[[str], str]
) -> list[Observation]:
    """What differs between two answers of the same side to the same request, as patterns.

    ``rules`` are applied first (as :func:`shadow.compare.compare` does): what they already
    hide is not observed again, and tolerance and instants hold at the leaves. Non-JSON bodies
    give nothing (status and headers never do: only JSON body pointers are learned).

    ``token`` is taken for symmetry with :func:`shadow.compare.compare` but never called: a
    member name that is not a plain field name becomes ``*`` in a pattern, which says less than
    any token (a token still tells one patient's entry from another's across pairs).

    An array whose elements a field names (:func:`element_key`) is matched by that field: if
    the common elements come in another order it proposes ``unordered`` with that key (at its
    pattern, never ignores of its elements), and differences inside matched elements are
    observed as usual. An array that only reorders elements nothing names proposes nothing.
    Sorted, deduplicated.
    """
    del token  # see the docstring: patterns never hold a token
    if first == second:
        return []
    a, b = _parse(first), _parse(second)
    if a is _NOT_JSON or b is _NOT_JSON:
        return []
    seen = _Observer(rules.tolerance, rules.instants)
    try:
        if rules.trie is not None:
            a, b = prepare(a, rules.trie), prepare(b, rules.trie)
        seen.value(a, b, [])
    except _Enough:
        pass  # a wholly different pair: the patterns found so far stand for it
    except RecursionError:
        return []  # deeper than the stack: nothing precise to say, and the root is never proposed
    return sorted(seen.found, key=observation_order)


def observation_order(o: Observation) -> tuple[str, str, str]:
    return (o.pointer, o.rule, o.key or "")


def _parse(body: bytes) -> Any:
    try:
        return _DECODE.decode(body)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return _NOT_JSON


def pattern(path: Sequence[Segment]) -> str | None:
    """The pattern of a raw path: positions and names that are not plain field names become
    ``*``; None when that covers a whole document."""
    segments = [s if type(s) is str and PLAIN_NAME.fullmatch(s) else WILDCARD for s in path]
    if all(s == WILDCARD for s in segments):
        return None
    return "".join("/" + escape(s) for s in segments)


class _Enough(Exception):
    """COUNT_CAP differences seen: the pair is wholly different, stop walking it."""


class _Leaf(Found):
    """Collects what the comparison engine finds at a leaf, as raw relative paths."""

    def __init__(self) -> None:
        super().__init__(0, str)
        self.paths: list[tuple[Segment, ...]] = []

    def add(self, part: Part, path: Sequence[Segment], kind: Kind, *, plain: bool = False) -> None:
        self.paths.append(tuple(path))


class _Observer:
    """Descends two prepared documents where they differ, like :mod:`shadow.walk`, but matches
    plain arrays by a key field when one exists, so a reorder is seen as one."""

    def __init__(self, tolerance: float, instants: bool) -> None:
        self.tolerance = tolerance
        self.instants = instants
        self.found: set[Observation] = set()
        self.count = 0
        self._patterns: dict[tuple[Segment, ...], str | None] = {}
        """Every element is at position :data:`_ANY`: paths repeat, and so do patterns."""

    def emit(self, path: Sequence[Segment], rule: Rule = "ignore", key: str | None = None) -> None:
        self.count += 1
        steps = tuple(path)
        where = self._patterns.get(steps, _ABSENT)
        if where is _ABSENT:
            where = self._patterns[steps] = pattern(steps)
        if where is not None:
            self.found.add(Observation(where, rule, key))
        if self.count >= COUNT_CAP:
            raise _Enough

    def value(self, a: Any, b: Any, path: list[Segment]) -> None:
        ta, tb = type(a), type(b)
        if ta is dict and tb is dict:
            names = sorted(a.keys() | b.keys())
            absent = [_ABSENT] * len(names)
            xs, ys = list(map(a.get, names, absent)), list(map(b.get, names, absent))
            self.pairs(names, xs, ys, path)
        elif ta is list and tb is list:
            self.array(a, b, path)
        elif ta is Unordered and tb is Unordered:
            self.unordered(a, b, path)
        else:
            # Leaves (and mismatched types): the engine decides, with tolerance and instants.
            leaf = _Leaf()
            walk(a, b, leaf, tolerance=self.tolerance, instants=self.instants)
            for rel in leaf.paths:
                self.emit([*path, *rel])

    def pairs(
        self, segments: Sequence[Segment], xs: Sequence[Any], ys: Sequence[Any], path: list[Segment]
    ) -> None:
        quiet = 0
        for segment, x, y in zip(segments, xs, ys, strict=True):
            known = len(self.found)
            if x is _ABSENT or y is _ABSENT:
                self.emit([*path, segment])
            elif not _same(x, y):
                path.append(segment)
                self.value(x, y, path)
                path.pop()
            else:
                continue
            if type(segment) is int:  # an element: see _QUIET
                quiet = 0 if len(self.found) > known else quiet + 1
                if quiet >= _QUIET:
                    return

    def array(self, a: list[Any], b: list[Any], path: list[Segment]) -> None:
        key = element_key(a, b)
        if key is not None:
            ka, kb = [e[key] for e in a], [e[key] for e in b]
            if ka != kb:
                self.keyed(a, b, ka, kb, key, path)
                return
        elif len(a) == len(b) and Counter(map(_canonical, a)) == Counter(map(_canonical, b)):
            return  # the same elements in another order, and no field to match them by
        n = max(len(a), len(b))
        xs = a + [_ABSENT] * (n - len(a))
        ys = b + [_ABSENT] * (n - len(b))
        self.pairs([_ANY] * n, xs, ys, path)

    def keyed(
        self,
        a: list[Any],
        b: list[Any],
        ka: list[Any],
        kb: list[Any],
        key: str,
        path: list[Segment],
    ) -> None:
        in_a, in_b = dict(zip(ka, a, strict=True)), dict(zip(kb, b, strict=True))
        if [k for k in ka if k in in_b] != [k for k in kb if k in in_a]:
            self.emit(path, "unordered", key)
        for k in chain(ka, kb):
            if k not in in_a or k not in in_b:
                self.emit([*path, _ANY])  # an element on one side only
        common = [k for k in ka if k in in_b]
        self.pairs([_ANY] * len(common), [in_a[k] for k in common], [in_b[k] for k in common], path)

    def unordered(self, a: Unordered, b: Unordered, path: list[Segment]) -> None:
        """An array a configured rule already matches by key: elements paired as the engine
        pairs them, so only what differs inside them is observed."""
        if a.mode != b.mode:
            a, b = _reconciled(a, b)
        if a.keys == b.keys:
            self.pairs([_ANY] * len(a), a, b, path)
        elif a.mode == WHOLE:
            self.emit([*path, _ANY])  # whole elements on one side only
        else:
            in_a, in_b = dict(zip(a.keys, a, strict=True)), dict(zip(b.keys, b, strict=True))
            union = [*in_a, *(k for k in in_b if k not in in_a)]
            absent = [_ABSENT] * len(union)
            self.pairs(
                [_ANY] * len(union),
                list(map(in_a.get, union, absent)),
                list(map(in_b.get, union, absent)),
                path,
            )


def element_key(a: Sequence[Any], b: Sequence[Any]) -> str | None:
    """The plain field that names the elements of both arrays, or None.

    It must be in every element of both, hold a string or an integer, unique on each side.
    First a field whose values are the same set on both sides (it names the same elements:
    ``id``, then ``*_id`` fields, then others, by name); else an identifier (``id``, ``*_id``)
    whose sets differ: the arrays then hold partly different elements. Any other field whose
    values differ is data, not a name: a single element whose ``amount`` changed is that
    element changed, not another element."""
    if not a or not b or not all(type(e) is dict for e in chain(a, b)):
        return None
    ranked_names = []
    for name in set(a[0]).intersection(*a[1:], *b):
        if not PLAIN_NAME.fullmatch(name):
            continue
        ka, kb = [e[name] for e in a], [e[name] for e in b]
        if not all(type(k) is str or type(k) is int for k in chain(ka, kb)):
            continue
        sa, sb = set(ka), set(kb)
        if len(sa) != len(ka) or len(sb) != len(kb):
            continue
        identifier = name == "id" or name.endswith("_id")
        if sa != sb and not identifier:
            continue
        ranked_names.append((sa != sb, name != "id", not identifier, name))
    return min(ranked_names)[3] if ranked_names else None


def _same(x: Any, y: Any) -> bool:
    """Certainly equal as JSON (``==`` alone has ``True == 1``); False may still be equal at
    the leaves, where the engine decides."""
    if x is y:
        return True
    if x != y:
        return False
    try:
        return orjson.dumps(x) == orjson.dumps(y) or orjson.dumps(
            x, option=orjson.OPT_SORT_KEYS
        ) == orjson.dumps(y, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # integers beyond 64 bits, nesting beyond 255: descend
        return False


def _canonical(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return repr(value).encode()


def _reconciled(a: Unordered, b: Unordered) -> tuple[Unordered, Unordered]:
    """Both arrays keyed alike, as the engine reconciles them (:mod:`shadow.walk`)."""
    if a.mode == WHOLE or b.mode == WHOLE:
        return (
            a if a.mode == WHOLE else whole(list(a)),
            b if b.mode == WHOLE else whole(list(b)),
        )
    return _ranked(a), _ranked(b)


def _ranked(items: Unordered) -> Unordered:
    if items.mode == "ranked":
        return items
    return sort_by(list(items), [ranked(k) for k in items.keys], "ranked")


# -- rules SREs accepted ----------------------------------------------------------------------


def merge(
    rules: CompareRules, ignore: Iterable[str] = (), unordered: Mapping[str, str] | None = None
) -> CompareRules:
    """The configured rules plus accepted ones. A configured unordered key wins over an
    accepted one; a pattern that would cover a whole document is dropped (only a hand-edited
    table could hold one)."""
    extra_ignore = tuple(
        dict.fromkeys(p for p in ignore if p not in rules.ignore and not covers_document(p))
    )
    extra_unordered = {
        p: k
        for p, k in (unordered or {}).items()
        if p not in rules.unordered and not covers_document(p) and PLAIN_NAME.fullmatch(k)
    }
    if not extra_ignore and not extra_unordered:
        return rules
    return msgspec.structs.replace(
        rules,
        ignore=(*rules.ignore, *extra_ignore),
        unordered={**rules.unordered, **extra_unordered},
    )
