"""Route matching: method and raw path -> dataset, kind, record key. Pure: no I/O.

The proxy forwards the raw path unchanged, so it must route it exactly as the backend will
read it: percent-escapes are decoded before matching (``/v1/datasets/dc%69r`` is ``dcir``).
A path a backend might normalise into another one — empty, ``.`` or ``..`` segments, an
encoded ``/`` or ``\\``, ``;`` parameters, a ``#``, a broken escape, control characters — is
never guessed at: :meth:`Router.match` refuses it, and :meth:`Router.route` routes it
*ambiguous*, with every dataset any of its plausible readings names (:func:`readings`), so
that no path can escape its route or land on another dataset unseen. The forwarder serves an
ambiguous read only from the side every one of those datasets is served by, and refuses an
ambiguous write past ``source`` (it cannot name the record to lock and journal). A record key
bascule cannot normalise (an integer route's ``abc``) is ambiguous too, on its known dataset.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from bascule.config import DEFAULT_DATASET, Route
from bascule.errors import RouteError
from proxy.plan import Kind

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
UNROUTED = "<unrouted>"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DATASET_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}\Z")
_FORBIDDEN = frozenset(["/", "\\"]) | {chr(c) for c in range(32)} | {"\x7f"}


@dataclass(frozen=True, slots=True)
class Match:
    dataset: str
    kind: Kind
    template: str
    """The route's path pattern (never the concrete path: it may carry identifiers)."""
    route: Route | None = None
    key: str | None = None
    """The record key's decoded value, when the route names one."""
    refused: RouteError | None = None
    """Set when bascule cannot read the path (or its key) one way: what :meth:`Router.match`
    raises for it. Such a request is never shadowed, and a write past ``source`` is refused
    with this error."""
    candidates: frozenset[str] = frozenset()
    """With ``refused``: every dataset the path could belong to, as a server may read it."""


@dataclass(frozen=True, slots=True)
class _Compiled:
    route: Route
    segments: tuple[str | None, ...]  # literal, or None for a parameter
    params: tuple[tuple[int, str], ...]  # (segment index, parameter name)
    methods: frozenset[str]


class Router:
    def __init__(self, routes: Sequence[Route], datasets: Collection[str]) -> None:
        self.datasets = frozenset(datasets)
        self._by_length: dict[int, list[_Compiled]] = {}
        for route in routes:
            parts = route.path.strip("/").split("/")
            # Literals match case-insensitively: some backends (ASP.NET Core by default) route
            # /V1/Datasets as /v1/datasets, so a path must not escape its route by its case.
            segments = tuple(None if p.startswith("{") else p.lower() for p in parts)
            params = tuple((i, p[1:-1]) for i, p in enumerate(parts) if p.startswith("{"))
            methods = set(route.methods)
            if "GET" in methods:
                methods.add("HEAD")  # backends answer HEAD wherever they answer GET
            compiled = _Compiled(route, segments, params, frozenset(methods))
            self._by_length.setdefault(len(segments), []).append(compiled)

    def match(self, method: str, raw_path: str) -> Match:
        """Route a request exactly. Raises :class:`RouteError` for a path or key it cannot
        read one way, and for a dataset not declared."""
        segments = split_path(raw_path)
        compiled = self._find(method, segments)
        if compiled is None:
            return Match(DEFAULT_DATASET, _kind(method), UNROUTED)
        return self._matched(compiled, segments)

    def route(self, method: str, raw_path: str) -> Match:
        """Route a request to forward: :meth:`match`, except that a path or key it cannot
        read one way comes back with ``refused`` set and its ``candidates``, for the
        forwarder to serve or refuse. Raises :class:`RouteError` only for a dataset not
        declared (a reading of an ambiguous path that names one included)."""
        try:
            segments = split_path(raw_path)
        except RouteError as exc:
            return self._ambiguous(method, raw_path, exc)
        compiled = self._find(method, segments)
        if compiled is None:
            return Match(DEFAULT_DATASET, _kind(method), UNROUTED)
        try:
            return self._matched(compiled, segments)
        except RouteError as exc:
            if exc.code != "bad_key":
                raise
            route = compiled.route
            dataset = self._dataset(compiled, segments)
            return Match(dataset, route.kind, route.path, route, None, exc, frozenset([dataset]))

    def _find(self, method: str, segments: Sequence[str]) -> _Compiled | None:
        for compiled in self._by_length.get(len(segments), ()):
            if method not in compiled.methods:
                continue
            if any(
                lit is not None and lit != seg.lower()
                for lit, seg in zip(compiled.segments, segments, strict=True)
            ):
                continue
            return compiled
        return None

    def _dataset(self, compiled: _Compiled, segments: Sequence[str]) -> str:
        route = compiled.route
        if route.dataset is not None:
            return route.dataset
        dataset = next(segments[i] for i, name in compiled.params if name == "dataset")
        if dataset not in self.datasets:
            shown = dataset if _DATASET_NAME.match(dataset) else "(not a dataset name)"
            raise RouteError(
                404,
                "unknown_dataset",
                f"unknown dataset {shown!r}: not declared in bascule's configuration",
            )
        return dataset

    def _matched(self, compiled: _Compiled, segments: Sequence[str]) -> Match:
        route = compiled.route
        dataset = self._dataset(compiled, segments)
        key = None
        if route.key is not None:
            key = next(segments[i] for i, name in compiled.params if name == route.key)
        if key is not None and route.key_format == "integer":
            if not key.isascii() or not key.isdigit():
                raise RouteError(400, "bad_key", "this record key must be a whole number")
            # The record the backend will read, whatever its spelling: leading zeros dropped
            # as text (int() of a 5,000-digit key raised past Python's conversion limit).
            key = key.lstrip("0") or "0"
        elif key is not None and route.key_format == "uuid":
            key = _uuid(key)
        return Match(dataset, route.kind, route.path, route, key)

    def _ambiguous(self, method: str, raw_path: str, refused: RouteError) -> Match:
        """A path a server could read more than one way: every dataset its readings name."""
        found: dict[str, _Compiled | None] = {}
        kinds: set[Kind] = set()
        for segments in readings(raw_path):
            compiled = self._find(method, segments)
            if compiled is None:
                found.setdefault(DEFAULT_DATASET, None)
                kinds.add(_kind(method))
                continue
            try:
                dataset = self._dataset(compiled, segments)
            except RouteError as exc:
                raise RouteError(
                    exc.status, exc.code, f"this path could be read as naming an {exc}"
                ) from None
            if found.get(dataset, compiled) is not compiled:
                found[dataset] = None  # two routes, or routed and not: no one route
            else:
                found[dataset] = compiled
            kinds.add(compiled.route.kind)
        kind: Kind = "write" if "write" in kinds else "read"
        if len(found) == 1:
            ((dataset, compiled),) = found.items()
            if compiled is not None:
                route = compiled.route
                return Match(dataset, kind, route.path, route, None, refused, frozenset(found))
        return Match(DEFAULT_DATASET, kind, UNROUTED, None, None, refused, frozenset(found))


def _kind(method: str) -> Kind:
    return "read" if method in SAFE_METHODS else "write"


_UUID = re.compile(r"^\{?(?:[0-9a-fA-F]{4}-?){7}[0-9a-fA-F]{4}\}?$")


def _uuid(key: str) -> str:
    """A uuid key as Postgres renders it (lower case, hyphenated), whatever spelling of it
    Postgres accepts: capitals, hyphens after any group of four digits or none, braces."""
    if not key.isascii() or not _UUID.match(key) or key.startswith("{") != key.endswith("}"):
        raise RouteError(400, "bad_key", "this record key must be a uuid")
    return str(uuid.UUID(key.strip("{}").replace("-", "")))


def split_path(raw_path: str) -> list[str]:
    """Decoded segments of a raw path, or :class:`RouteError` if it could be read two ways."""
    if not raw_path.startswith("/"):
        raise RouteError(400, "bad_path", "the path must start with '/'")
    if raw_path == "/":
        return []
    if "#" in raw_path or ";" in raw_path:
        # A fragment is never sent by a client that means it, and `;params` are stripped by
        # some servers (Tomcat, Spring) before routing: either could move a request off its
        # route, so neither is forwarded.
        raise RouteError(
            400, "bad_path", "the path has a '#' or ';', which bascule does not forward"
        )
    if _BAD_ESCAPE.search(raw_path):
        raise RouteError(400, "bad_path", "the path has a '%' that is not a valid escape")
    segments = []
    for raw in raw_path[1:].split("/"):
        try:
            seg = unquote(raw, errors="strict") if "%" in raw else raw
        except UnicodeDecodeError:
            raise RouteError(400, "bad_path", "the path has an escape that is not UTF-8") from None
        if seg in ("", ".", ".."):
            raise RouteError(400, "bad_path", "the path has an empty, '.' or '..' segment")
        if not _FORBIDDEN.isdisjoint(seg):
            raise RouteError(
                400, "bad_path", "the path has an encoded '/', '\\' or a control character"
            )
        segments.append(seg)
    return segments


def readings(raw_path: str) -> set[tuple[str, ...]]:
    """The ways a server might read a path, as decoded segments: each combination of cutting
    a ``#`` fragment, stripping ``;`` parameters (Tomcat, Spring), reading ``\\`` as ``/``
    (IIS), decoding an encoded separator before splitting, resolving dot segments and
    dropping empty ones (merged slashes, a trailing slash). A broken escape is read as is."""
    if not raw_path.startswith("/"):
        return {()}
    found: set[tuple[str, ...]] = set()
    for cut, params, backslash, separators, dots, empty in itertools.product(
        (False, True), repeat=6
    ):
        path = raw_path.split("#", 1)[0] if cut else raw_path
        parts = path[1:].split("/")
        if backslash:
            parts = [p for part in parts for p in part.split("\\")]
        if params:
            parts = [part.split(";", 1)[0] for part in parts]
        segments: list[str] = []
        for part in parts:
            segment = unquote(part, errors="replace") if "%" in part else part
            if separators:
                segments += re.split(r"[/\\]" if backslash else "/", segment)
            else:
                segments.append(segment)
        if dots:
            resolved: list[str] = []
            for segment in segments:
                if segment == "..":
                    if resolved:
                        resolved.pop()
                elif segment != ".":
                    resolved.append(segment)
            segments = resolved
        if empty:
            segments = [segment for segment in segments if segment]
        found.add(tuple(segments))
    return found


def path_values(pattern: str, target: str) -> dict[str, str]:
    """Raw (still escaped) parameter values of ``target`` under ``pattern``."""
    parts = pattern.strip("/").split("/")
    given = target.split("?", 1)[0].strip("/").split("/")
    return {p[1:-1]: g for p, g in zip(parts, given, strict=False) if p.startswith("{")}


def json_pointer(doc: Any, pointer: str) -> Any:
    """The value at JSON pointer ``pointer`` in ``doc``; KeyError or IndexError if absent."""
    for token in pointer.lstrip("/").split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        doc = doc[int(token)] if isinstance(doc, list) else doc[token]
    return doc
