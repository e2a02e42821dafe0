"""Chunk checksums computed inside Postgres, and narrowing differing chunks down to keys.

A table is cut into chunks of about :data:`CHUNK_ROWS` keys, in the order both servers agree on
(:meth:`~cutover.tables.Pair.key_order`): the chunks' first keys, the *thresholds*, are found by
streaming the keys of one side once (a server-side cursor over a window, every
``CHUNK_ROWS``-th key). Each side then reads its table once, sequentially, in block ranges
(TID range scans): every row is given its chunk by ``width_bucket`` over the thresholds and
hashed (:meth:`~cutover.tables.Pair.row_hash`), and each block range answers per chunk
``count(*)``, ``sum(h)`` and ``bit_xor(h)``. These add up across block ranges in any order, so
both sides scan at full sequential speed, independently, and a scan can stop and resume at any
block range. A row moved by an update during the scan may be counted twice or not at all: that
only makes its chunk differ, and narrowing reads it again.

A chunk whose figures differ is narrowed: split into sub-chunks (boundaries from the side
holding more of its rows) while it holds more than :data:`LEAF_ROWS` rows, then both sides'
per-row hashes of the differing leaves are compared key by key.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from bascule.stages import Side
from cutover.tables import Conn, Pair, ident, paired, reading

CHUNK_ROWS = 16384
"""Keys per chunk. Narrowing a differing chunk costs a split and a few thousand row hashes per
side; the per-row work of a scan does not depend on it (``width_bucket`` is a binary search over
a few hundred thresholds per million rows)."""
LEAF_ROWS = 2048
"""A differing range with at most this many rows on either side is compared row by row."""
SPLIT = 8
"""Sub-chunks a larger differing range is split into."""
BLOCKS_PER_SCAN = 2048
"""Heap blocks read per query of a scan (16 MB of 8 kB blocks, about 130,000 dcir rows): the unit
of progress and resume. Each query costs its planning and its thresholds; at 512 blocks, a
2M-row verification took about 20% longer on the 2-core bench machine."""
_MAX_CHUNKS = 100_000
"""At most this many chunks (a stale estimate must not cut a table into millions)."""
_OR_RANGES = 64
"""Up to this many ranges are read with one predicate each (index ranges); beyond, one pass
filters rows by chunk."""

Key = str
"""A key as text, as its type renders it under the pinned settings (what the proxy names)."""


@dataclass(frozen=True, slots=True)
class Figures:
    """A chunk's figures on one side: rows, and the sum and XOR of their 64-bit hashes."""

    count: int = 0
    total: int = 0
    xor: int = 0

    def __add__(self, other: Figures) -> Figures:
        return Figures(self.count + other.count, self.total + other.total, self.xor ^ other.xor)

    def as_list(self) -> list[int]:
        return [self.count, self.total, self.xor]


@dataclass(frozen=True, slots=True)
class Range:
    """Keys from ``lo`` (included; None: from the first) to ``hi`` (excluded; None: to the
    last), in the agreed order."""

    lo: Key | None
    hi: Key | None


def ranges_of(thresholds: Sequence[Key]) -> list[Range]:
    """The chunks that ``thresholds`` (each chunk's first key but the first's) cut out."""
    edges: list[Key | None] = [None, *thresholds, None]
    return [Range(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def predicate(pair: Pair, ranges: Sequence[Range]) -> tuple[str, list[Any]]:
    """SQL keeping the rows of ``ranges`` (an OR of key ranges), and its parameters."""
    order = pair.key_order()
    terms, params = [], []
    for r in ranges:
        parts = []
        if r.lo is not None:
            parts.append(f"{order} >= {pair.key_param()}")
            params.append(r.lo)
        if r.hi is not None:
            parts.append(f"{order} < {pair.key_param()}")
            params.append(r.hi)
        terms.append("(" + (" AND ".join(parts) or "true") + ")")
    return "(" + (" OR ".join(terms) or "false") + ")", params


async def thresholds(
    conn: Conn,
    pair: Pair,
    side: Side,
    every: int,
    where: tuple[str, list[Any]] = ("true", []),
    on_rows: Callable[[int], None] | None = None,
) -> list[Key]:
    """The first key of every chunk of ``every`` keys but the first (``where``: of those
    rows only), streamed from ``side``: by keyset pages where its key index serves the agreed
    order (each step an index range of ``every`` keys), else from one server-side cursor
    over a window, which sorts them once."""
    if not pair.index_ordered(side):
        return await _window_thresholds(conn, pair, side, every, where, on_rows)
    table = pair.side(side)
    order = pair.key_order()
    found: list[Key] = []
    async with reading(table.backend, f"finding the chunks of {table.qualified}"):
        while True:
            after = f" AND {order} >= {pair.key_param()}" if found else ""
            cur = await conn.execute(
                f"SELECT t.{ident(pair.key)}::text FROM {table.qualified} t"
                f" WHERE {where[0]}{after} ORDER BY {order} OFFSET {int(every)} LIMIT 1",
                [*where[1], *found[-1:]],
            )
            row = await cur.fetchone()
            if row is None:
                return found
            found.append(row[0])
            if on_rows is not None:
                on_rows(every)


async def integer_thresholds(conns: Mapping[Side, Conn], pair: Pair) -> list[Key] | None:
    """Thresholds of an integer key cut by arithmetic: the span of keys both sides hold, in
    ranges expected to hold :data:`CHUNK_ROWS` keys by the planner's row estimate. No pass
    over the keys: chunks of a skewed table come out uneven, and narrowing splits the large
    ones that differ. None when the estimate is missing (never analyzed)."""
    spans = []
    estimate = 0
    for side in (Side.SOURCE, Side.TARGET):
        table = pair.side(side)
        async with reading(table.backend, f"finding the keys of {table.qualified}"):
            cur = await conns[side].execute(
                f"SELECT min(t.{ident(pair.key)}), max(t.{ident(pair.key)})"
                f" FROM {table.qualified} t"
            )
            row = await cur.fetchone()
        if row is not None and row[0] is not None:
            spans.append((int(row[0]), int(row[1])))
        estimate = max(estimate, table.estimate)
    if not spans:
        return []
    if estimate <= 0:
        return None
    low, high = min(s[0] for s in spans), max(s[1] for s in spans)
    span = high - low + 1
    chunks = min(max(1, round(estimate / CHUNK_ROWS)), _MAX_CHUNKS)
    width = max(1, math.ceil(span / chunks))
    return [str(low + i * width) for i in range(1, math.ceil(span / width))]


async def _window_thresholds(
    conn: Conn,
    pair: Pair,
    side: Side,
    every: int,
    where: tuple[str, list[Any]],
    on_rows: Callable[[int], None] | None,
) -> list[Key]:
    table = pair.side(side)
    sql = (
        f"SELECT k::text, rn FROM (SELECT t.{ident(pair.key)} AS k,"
        f" row_number() OVER (ORDER BY {pair.key_order()}) AS rn"
        f" FROM {table.qualified} t WHERE {where[0]}) s"
        f" WHERE mod(rn, {int(every)}) = 1 AND rn > 1"
    )
    found: list[tuple[int, Key]] = []
    async with reading(table.backend, f"finding the chunks of {table.qualified}"):
        async with conn.transaction():
            async with conn.cursor(name="bascule_thresholds") as cur:
                await cur.execute(sql, where[1])
                while rows := await cur.fetchmany(1000):
                    found.extend((rn, k) for k, rn in rows)
                    if on_rows is not None:
                        on_rows(len(rows) * every)
    # The window hands them out in key order; sorting by rank says so without relying on it.
    found.sort()
    return [k for _, k in found]


def _aggregate_sql(pair: Pair, side: Side, bounds: str, where: str) -> str:
    """Per-chunk figures of the rows ``where`` keeps, chunked by ``width_bucket`` over the
    thresholds given as parameter ``bounds``. ``OFFSET 0`` keeps the hash computed once per row
    (inlined into three aggregates, it would be computed three times)."""
    return (
        f"SELECT width_bucket(kc, {pair.keys_param(bounds)}) AS chunk, count(*), sum(h),"
        f" bit_xor(h) FROM (SELECT {pair.key_order()} AS kc, {pair.row_hash()} AS h"
        f" FROM {pair.side(side).qualified} t WHERE {where} OFFSET 0) s GROUP BY 1"
    )


async def _figures(
    conn: Conn, pair: Pair, side: Side, sql: str, params: Sequence[Any], doing: str
) -> dict[int, Figures]:
    async with reading(pair.side(side).backend, doing):
        cur = await conn.execute(sql, params)
        rows = await cur.fetchall()
    return {int(c): Figures(int(n), int(s or 0), int(x or 0)) for c, n, s, x in rows}


async def scan(
    conn: Conn,
    pair: Pair,
    side: Side,
    bounds: Sequence[Key],
    start: int,
    on_range: Callable[[int, dict[int, Figures]], Awaitable[None]],
) -> None:
    """Read ``side``'s table from heap block ``start`` to its end, :data:`BLOCKS_PER_SCAN` at
    a time; after each, ``on_range(next block, figures by chunk)``. The last range is open:
    rows appended since the scan began are read too."""
    table = pair.side(side)
    if table.server_version < 140000:
        # No TID range scans before PostgreSQL 14: one pass, which resumes from the start.
        sql = _aggregate_sql(pair, side, "%s", "true")
        found = await _figures(conn, pair, side, sql, [list(bounds)], "scanning")
        await on_range(max(table.pages, 1), found)
        return
    block = start
    while True:
        last = block + BLOCKS_PER_SCAN >= table.pages
        where = "t.ctid >= %s::tid" + ("" if last else " AND t.ctid < %s::tid")
        params: list[Any] = [list(bounds), f"({block},0)"]
        if not last:
            params.append(f"({block + BLOCKS_PER_SCAN},0)")
        sql = _aggregate_sql(pair, side, "%s", where)
        found = await _figures(conn, pair, side, sql, params, f"scanning {table.qualified}")
        block += BLOCKS_PER_SCAN
        await on_range(block, found)
        if last:
            return


async def range_figures(
    conn: Conn, pair: Pair, side: Side, bounds: Sequence[Key], within: Range
) -> dict[int, Figures]:
    """Figures of the sub-chunks that ``bounds`` cut ``within`` into."""
    where, params = predicate(pair, [within])
    sql = _aggregate_sql(pair, side, "%s", where)
    return await _figures(conn, pair, side, sql, [list(bounds), *params], "narrowing a chunk")


async def row_hashes(
    conn: Conn, pair: Pair, side: Side, ranges: Sequence[Range], bounds: Sequence[Key] = ()
) -> dict[Key, int]:
    """Every row's hash in ``ranges``, by key. More than a few ranges are read in one pass that
    keeps the rows whose chunk (by ``bounds``, the ranges' chunking) is one of theirs."""
    table = pair.side(side)
    if len(ranges) <= _OR_RANGES or not bounds:
        where, params = predicate(pair, ranges)
    else:
        wanted = sorted({_chunk_of(bounds, r) for r in ranges})
        where = f"width_bucket({pair.key_order()}, {pair.keys_param()}) = ANY(%s::int[])"
        params = [list(bounds), wanted]
    sql = (
        f"SELECT t.{ident(pair.key)}::text, {pair.row_hash()} FROM {table.qualified} t"
        f" WHERE {where}"
    )
    async with reading(table.backend, f"reading row hashes of {table.qualified}"):
        cur = await conn.execute(sql, params)
        return {k: int(h) for k, h in await cur.fetchall()}


async def key_hashes(conn: Conn, pair: Pair, side: Side, keys: Iterable[Key]) -> dict[Key, int]:
    """The hash of each of ``keys``' rows on ``side`` (absent keys: not in the answer).

    Keys may come from the journal, where the proxy names a record by whatever the route read
    (any digits for an integer key): a key that the key's type cannot hold (out of range, not
    of its syntax) names no row on either side, so it is absent from both answers (equal:
    nothing to repair) instead of failing the cast of the whole batch, and every settling or
    resume after it. On a session outside any transaction (a failed batch is asked again)."""
    wanted = [k for k in keys if _sendable(k)]
    if not wanted:
        return {}
    table = pair.side(side)
    sql = (
        f"SELECT t.{ident(pair.key)}::text, {pair.row_hash()} FROM {table.qualified} t"
        f" WHERE t.{ident(pair.key)} = ANY({pair.keys_param()})"
    )
    found: dict[Key, int] = {}
    async with reading(table.backend, f"reading rows of {table.qualified} by key"):
        for i in range(0, len(wanted), 10000):
            batch = wanted[i : i + 10000]
            try:
                cur = await conn.execute(sql, [batch])
            except psycopg.DataError:
                # Some key the type cannot read: ask again for those it can. (Any other
                # failure fails again, and is raised.)
                batch = await holdable(conn, pair, batch)
                if not batch:
                    continue
                cur = await conn.execute(sql, [batch])
            # A key equal under a non-deterministic collation is not the key asked for.
            asked = set(batch)
            found.update((k, int(h)) for k, h in await cur.fetchall() if k in asked)
    return found


def _sendable(key: Key) -> bool:
    """Can ``key`` be sent as text at all? Not with a NUL (no PostgreSQL text holds one) or
    a lone surrogate (not UTF-8): such a key names no row."""
    if "\x00" in key:
        return False
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True


async def holdable(conn: Conn, pair: Pair, keys: list[Key]) -> list[Key]:
    """Of ``keys``, those the key's type can read, as the server reads them (its own input
    rules, whatever its version: no copy of them here can drift). A batch that fails is
    halved until each failing key is alone: a few queries per such key, none when all are
    good. On a session outside any transaction."""
    try:
        await conn.execute(f"SELECT cardinality({pair.keys_param()})", [keys])
    except psycopg.DataError:
        if len(keys) <= 1:
            return []
        half = len(keys) // 2
        return [*await holdable(conn, pair, keys[:half]), *await holdable(conn, pair, keys[half:])]
    return keys


def _chunk_of(bounds: Sequence[Key], r: Range) -> int:
    return 0 if r.lo is None else list(bounds).index(r.lo) + 1


@dataclass(frozen=True, slots=True)
class Differing:
    """A range whose figures differ, with its rows on each side."""

    range: Range
    rows: Mapping[Side, int]


def differing(
    bounds: Sequence[Key], figures: Mapping[Side, Mapping[int, Figures]]
) -> list[Differing]:
    """The chunks whose figures differ between the sides."""
    chunks = ranges_of(bounds)
    src, tgt = figures[Side.SOURCE], figures[Side.TARGET]
    found = []
    for i in sorted(set(src) | set(tgt)):
        a, b = src.get(i, Figures()), tgt.get(i, Figures())
        if a != b:
            found.append(Differing(chunks[i], {Side.SOURCE: a.count, Side.TARGET: b.count}))
    return found


Compared = dict[Key, tuple[int | None, int | None]]
"""Keys whose rows differ: (source's hash, target's hash), None where the row is absent."""


def compare_rows(source: Mapping[Key, int], target: Mapping[Key, int]) -> Compared:
    return {
        k: (source.get(k), target.get(k))
        for k in set(source) | set(target)
        if source.get(k) != target.get(k)
    }


async def narrow(
    conns: Mapping[Side, Conn],
    pair: Pair,
    found: Sequence[Differing],
    bounds: Sequence[Key] = (),
) -> Compared:
    """The keys whose rows differ within the differing ranges ``found``."""
    leaves = [d for d in found if max(d.rows.values()) <= LEAF_ROWS]
    larger = [d for d in found if max(d.rows.values()) > LEAF_ROWS]
    result: Compared = {}
    next_level: list[Differing] = []
    for d in larger:
        # Sub-chunk boundaries from the side that holds more of the range's rows.
        side = max(d.rows, key=lambda s: d.rows[s])
        step = max(2, math.ceil(d.rows[side] / SPLIT))
        sub = await thresholds(conns[side], pair, side, step, predicate(pair, [d.range]))
        if not sub:
            leaves.append(d)  # cannot be cut further (one side's rows are all one key)
            continue
        figures = await paired(
            range_figures(conns[Side.SOURCE], pair, Side.SOURCE, sub, d.range),
            range_figures(conns[Side.TARGET], pair, Side.TARGET, sub, d.range),
        )
        inner = differing(sub, {Side.SOURCE: figures[0], Side.TARGET: figures[1]})
        next_level.extend(Differing(_clip(r.range, d.range), r.rows) for r in inner)
    if next_level:
        result.update(await narrow(conns, pair, next_level))
    for i in range(0, len(leaves), 1000):
        batch = [d.range for d in leaves[i : i + 1000]]
        src, tgt = await paired(
            row_hashes(conns[Side.SOURCE], pair, Side.SOURCE, batch, bounds),
            row_hashes(conns[Side.TARGET], pair, Side.TARGET, batch, bounds),
        )
        result.update(compare_rows(src, tgt))
    return result


def _clip(inner: Range, outer: Range) -> Range:
    """A sub-chunk's range within its chunk (its open ends are the chunk's ends)."""
    lo = outer.lo if inner.lo is None else inner.lo
    hi = outer.hi if inner.hi is None else inner.hi
    return Range(lo, hi)
