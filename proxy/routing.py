"""Route matching: method and raw path -> dataset, kind, record key. Pure: no I/O.

The proxy forwards the raw path unchanged, so it must route it exactly as the backend will
read it: percent-escapes are decoded before matching (``/v1/datasets/dc%69r`` is ``dcir``).
Anything a backend might normalise into another path — empty, ``.`` or ``..`` segments, an
encoded ``/`` or ``\\``, a broken escape, control characters — is refused outright rather than
guessed at, so no path can escape its route or land on another dataset.
"""

from __future__ import annotations

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
        """Route a request. Raises :class:`RouteError` for a path it will not forward."""
        segments = split_path(raw_path)
        for compiled in self._by_length.get(len(segments), ()):
            if method not in compiled.methods:
                continue
            if any(
                lit is not None and lit != seg.lower()
                for lit, seg in zip(compiled.segments, segments, strict=True)
            ):
                continue
            return self._matched(compiled, segments)
        kind: Kind = "read" if method in SAFE_METHODS else "write"
        return Match(DEFAULT_DATASET, kind, UNROUTED)

    def _matched(self, compiled: _Compiled, segments: Sequence[str]) -> Match:
        values = {name: segments[i] for i, name in compiled.params}
        route = compiled.route
        dataset = route.dataset if route.dataset is not None else values["dataset"]
        if dataset not in self.datasets:
            shown = dataset if _DATASET_NAME.match(dataset) else "(not a dataset name)"
            raise RouteError(
                404,
                "unknown_dataset",
                f"unknown dataset {shown!r}: not declared in bascule's configuration",
            )
        key = values.get(route.key) if route.key is not None else None
        if key is not None and route.key_format == "integer":
            if not key.isascii() or not key.isdigit():
                raise RouteError(400, "bad_key", "this record key must be a whole number")
            key = str(int(key))  # the record the backend will read, whatever its spelling
        elif key is not None and route.key_format == "uuid":
            key = _uuid(key)
        return Match(dataset, route.kind, route.path, route, key)


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
