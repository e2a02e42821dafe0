"""A dataset's tables in the two backends' databases: sessions, catalog, schema, row hashes.

Verification and backfill read the backends' own databases (``[backends.X] database``) with
psycopg, on sessions whose settings are pinned (:data:`PINNED`): whatever each server's or
database's defaults (a target set to ``Europe/Paris``, another ``DateStyle``), a value renders
and hashes the same on both. A dataset's table is the table named after it, its key its
single-column primary key; keys travel as their text form under those settings, which is what
the proxy names a record by (``Namer.record(dataset, key)``, the key as the route reads it).

No record value leaves here except keys, as text, to the callers that turn them into tokens;
errors name tables, columns and SQLSTATEs, never a value (a server's message may quote one).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg.rows import TupleRow

from bascule.config import Backend, Config
from bascule.errors import ConfigError, Refused, UpstreamError, UpstreamUnreachable
from bascule.stages import Side

Conn = psycopg.AsyncConnection[TupleRow]
SyncConn = psycopg.Connection[TupleRow]
T = TypeVar("T")

# Session settings every verification and backfill session runs with: the text form of a
# timestamptz depends on TimeZone, of a date on DateStyle, of an interval on IntervalStyle, of a
# float on extra_float_digits (1: the shortest exact form), of bytea on bytea_output, of money
# on lc_monetary, of text sent to us on client_encoding. search_path is pinned once the table
# is found, so no function or operator of the backend's own schemas is picked up by name.
PINNED: tuple[tuple[str, str], ...] = (
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
    ("client_encoding", "UTF8"),
    ("standard_conforming_strings", "on"),
    # Plans here are large scans run once: compiling them costs more than it saves.
    ("jit", "off"),
    ("statement_timeout", "0"),
    ("idle_in_transaction_session_timeout", "600000"),
)

# Types whose own hash function tells identical values only (their equality is identity), so
# ``hash_record_extended`` may hash them in their binary form: no rendering to text, the costly
# part of hashing a row (timestamps especially). Text types are hashed under COLLATE "C" (bytes,
# whatever the column's collation); numeric adds its scale unless its type fixes it (1.0 = 1.00,
# but they render apart), and which special value it is (:data:`_NUMERIC_SPECIAL`); floats are
# hashed as their bytes, every NaN as one (:func:`_float_bytes`). Anything else (intervals:
# '1 day' = '24 hours'; json, jsonb, enums, money, arrays, composites...) is hashed as its text
# form under the pinned settings.
_NATIVE = frozenset(
    {"int2", "int4", "int8", "bool", "date", "timestamp", "timestamptz", "time", "uuid", "bytea"}
)
_TEXTUAL = frozenset({"text", "varchar", "bpchar", "name"})
_FIXED_SCALE = re.compile(r"^numeric\(\d+,\d+\)$")
_FLOATS = {"float8": "float8send", "float4": "float4send"}
"""Floats are hashed as their bytes (network order): -0 and 0, equal to ``=``, render apart."""
_NUMERIC_SPECIAL = (
    "coalesce(scale({ref}), CASE WHEN {ref} = 'NaN'::numeric THEN -1"
    " WHEN {ref} > 0 THEN -2 WHEN {ref} < 0 THEN -3 END)"
)
"""A free-scale numeric's scale, or which special value it is: numeric's hash function gives
NaN, Infinity and -Infinity one hash (the seed), and ``scale`` is NULL for all three, yet they
render, compare and serve apart. A scale is never negative, so the tags cannot be taken for
one; NULL stays NULL (no branch holds), and the CASE is evaluated for special values only.
A ``numeric(p,s)`` cannot hold infinities (PostgreSQL refuses them under a precision), and its
NaN already hashes apart from every number: it needs no tag."""
_INTEGER_KEYS = frozenset({"int2", "int4", "int8"})


async def paired(first: Coroutine[Any, Any, T], second: Coroutine[Any, Any, T]) -> tuple[T, T]:
    """Run one read on each side at once. If one fails, the other is cancelled and waited
    for (``asyncio.gather`` would leave it running on a session about to be closed)."""
    try:
        async with asyncio.TaskGroup() as group:
            a, b = group.create_task(first), group.create_task(second)
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None  # what failed first, as itself
    return a.result(), b.result()


def ident(name: str) -> str:
    """A quoted SQL identifier (names come from the catalog; quoting keeps any of them safe)."""
    return '"' + name.replace('"', '""') + '"'


def database_of(config: Config, side: Side) -> tuple[str, str]:
    """(backend name, DSN) of ``side``'s database; ConfigError naming the key when unset."""
    name = config.migration.source if side is Side.SOURCE else config.migration.target
    backend: Backend = config.backends[name]
    if not backend.database:
        raise ConfigError(
            config.source,
            f"backends.{name}.database",
            f"not set: verification and backfill read the {side.value}'s database through it "
            "(a libpq DSN such as postgresql://user@host/db)",
        )
    return name, backend.database


def hash_seed(hmac_key: bytes) -> int:
    """The seed of row hashes, derived from the HMAC key: a checkpoint's sums say nothing to
    someone who can hash a guessed row but does not hold the key."""
    digest = hmac.new(hmac_key, b"bascule-verify-seed", hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    """``format_type``: what two sides must agree on to be compared (``numeric(10,2)``)."""
    base: str
    """The base type's name (a domain's underlying type; ``int8``, ``text``...)."""
    category: str
    """``pg_type.typtype`` of the base: ``b`` base, ``e`` enum, ``c`` composite..."""
    collation: str | None
    domain: bool = False
    identity: str = ""
    """``pg_attribute.attidentity``: ``a`` GENERATED ALWAYS AS IDENTITY (an INSERT gives it a
    value only with OVERRIDING SYSTEM VALUE, an UPDATE never), ``d`` BY DEFAULT, or none."""
    generated: bool = False
    """A generated column (``GENERATED ALWAYS AS (...)``): its table computes it, nothing may
    write it."""


@dataclass(frozen=True)
class Table:
    """One side's table: its qualified name, columns and key."""

    side: Side
    backend: str
    qualified: str
    oid: int
    columns: dict[str, Column]
    key: str
    pages: int
    estimate: int
    """Rows by the planner's statistics (progress only; -1 when never analyzed)."""
    server_version: int

    @property
    def key_column(self) -> Column:
        return self.columns[self.key]


@dataclass(frozen=True)
class SchemaDiff:
    only_source: tuple[str, ...] = ()
    only_target: tuple[str, ...] = ()
    type_changed: tuple[tuple[str, str, str], ...] = ()
    """(column, source type, target type)."""

    @property
    def empty(self) -> bool:
        return not (self.only_source or self.only_target or self.type_changed)

    def as_json(self) -> dict[str, Any]:
        return {
            "only_source": list(self.only_source),
            "only_target": list(self.only_target),
            "type_changed": [
                {"column": c, "source": s, "target": t} for c, s, t in self.type_changed
            ],
        }


@dataclass(frozen=True)
class Pair:
    """A dataset's table on both sides, and how its rows are keyed, ordered and hashed."""

    dataset: str
    source: Table
    target: Table
    schema: SchemaDiff
    compared: tuple[str, ...]
    """Columns present on both sides with the same type, by name: what rows are compared on."""
    key: str
    key_type: str
    native_hash: bool = True
    """``hash_record_extended`` over binary values; False: md5 of the row's text (the servers'
    hash functions disagreed)."""
    seed: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.source.qualified

    def side(self, side: Side) -> Table:
        return self.source if side is Side.SOURCE else self.target

    def key_order(self, alias: str = "t") -> str:
        """The key as both servers order it: bytewise for text, numerically for numbers."""
        column = f"{alias}.{ident(self.key)}"
        return f'({column} COLLATE "C")' if self.source.key_column.collation else column

    def key_param(self, placeholder: str = "%s") -> str:
        """A key given as text, read as the key's type (under COLLATE "C" for text)."""
        cast = f"{placeholder}::text::{self.key_type}"
        return f'({cast} COLLATE "C")' if self.source.key_column.collation else cast

    def keys_param(self, placeholder: str = "%s") -> str:
        """An array of keys given as text, read as an array of the key's type."""
        return f"{placeholder}::text[]::{self.key_type}[]"

    def index_ordered(self, side: Side) -> bool:
        """Does ``side``'s primary key index serve the agreed order (a range of keys, or the
        keys in order, without a sort)? Not for a text key under another collation than C."""
        collation = self.side(side).key_column.collation
        return collation is None or collation in ("C", "POSIX")

    @property
    def integer_key(self) -> bool:
        return self.source.key_column.base in _INTEGER_KEYS

    def row_hash(self, alias: str = "t") -> str:
        """The row's 64-bit hash, keyed by the seed, over the key and the compared columns."""
        parts = []
        for name in self.compared:
            column = self.source.columns[name]
            ref = f"{alias}.{ident(name)}"
            if column.domain and column.base in _NATIVE | _TEXTUAL | {"numeric"}:
                ref = f"{ref}::{column.base}"  # hashed as its base type
            if column.base in _NATIVE:
                parts.append(ref)
            elif column.base in _TEXTUAL:
                parts.append(f'{ref} COLLATE "C"')
            elif column.base == "numeric":
                # numeric(p,s) holds every value at scale s: only a free scale needs hashing.
                fixed = not column.domain and _FIXED_SCALE.match(column.type)
                parts.append(ref if fixed else f"{ref}, {_NUMERIC_SPECIAL.format(ref=ref)}")
            elif column.base in _FLOATS:
                parts.append(_float_bytes(column.base, ref))
            else:
                parts.append(f'{ref}::text COLLATE "C"')
        row = f"ROW({', '.join(parts)})"
        if self.native_hash:
            return f"hash_record_extended({row}, {self.seed})"
        return f"('x' || left(md5('{self.seed}' || {row}::text), 16))::bit(64)::bigint"

    def columns_list(self, side: Side, alias: str | None = None) -> str:
        """:meth:`copied` into ``side``, as a column list (of ``alias``'s columns)."""
        prefix = f"{alias}." if alias else ""
        return ", ".join(prefix + ident(c) for c in self.copied(side))

    def copied(self, side: Side) -> tuple[str, ...]:
        """Columns a repair or a backfill writes into ``side``'s table (a backfill writes the
        target, a repair the side that is not the authority): those compared, the key first,
        but for the columns generated on ``side``, which its table computes and refuses to be
        given. A column generated on the other side only is written: its value there is what
        ``side`` must hold to compare equal. A generated column is still compared and hashed:
        a table that computes it otherwise than the other side's value is a difference that
        writing cannot fix, and is reported as one."""
        columns = self.side(side).columns
        ordered = (self.key, *(c for c in self.compared if c != self.key))
        return tuple(c for c in ordered if not columns[c].generated)

    def overriding(self, side: Side) -> str:
        """What an INSERT into ``side``'s table of :meth:`copied` needs to give its
        ``GENERATED ALWAYS AS IDENTITY`` columns their values (``OVERRIDING SYSTEM VALUE``,
        else refused), or "". (COPY FROM writes identity columns as given.)"""
        columns = self.side(side).columns
        if any(columns[c].identity == "a" for c in self.copied(side)):
            return " OVERRIDING SYSTEM VALUE"
        return ""

    def updatable(self, side: Side) -> tuple[str, ...]:
        """Of :meth:`copied` into ``side``, the columns an upsert may set on a row already
        there: not the key, nor an identity column GENERATED ALWAYS, which an UPDATE may only
        set to its default (such a column that differs stays different, and is reported)."""
        columns = self.side(side).columns
        return tuple(c for c in self.copied(side) if c != self.key and columns[c].identity != "a")


def _float_bytes(base: str, ref: str) -> str:
    """A float's bytes, every NaN as one: NaNs of other bit patterns (the sign bit of a NaN
    computed as Infinity - Infinity on x86) are equal (``=``) and render alike ('NaN'), and a
    repair (COPY text) could never make their bytes equal. -0 and 0 stay apart."""
    nan = f"'NaN'::{base}"
    return f"{_FLOATS[base]}(CASE WHEN {ref} = {nan} THEN {nan} ELSE {ref} END)"


def _settings(read_only: bool) -> list[tuple[str, str]]:
    settings = list(PINNED)
    if read_only:
        # Verification never writes: the server holds it to that.
        settings.append(("default_transaction_read_only", "on"))
    return settings


def _unreachable(backend: str, exc: psycopg.Error) -> UpstreamUnreachable:
    # A connection error says which server and database, never a row.
    return UpstreamUnreachable(
        backend, f"cannot reach its database (backends.{backend}.database): {exc}"
    )


@asynccontextmanager
async def session(
    config: Config, side: Side, purpose: str, *, read_only: bool = True
) -> AsyncIterator[tuple[str, Conn]]:
    """A pinned session on ``side``'s database: (backend name, connection). Autocommit."""
    backend, dsn = database_of(config, side)
    try:
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name=f"bascule {purpose}"[:63], connect_timeout=10
        )
    except psycopg.Error as exc:
        raise _unreachable(backend, exc) from None
    # Never prepared: a generic plan would cast the thresholds (given as text) for every row,
    # and hide constant TID ranges from the planner. Each statement is planned for its values.
    conn.prepare_threshold = None
    try:
        async with reading(backend, "pinning the session settings"):
            for name, value in _settings(read_only):
                await conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        yield backend, conn
    finally:
        await conn.close()


@contextmanager
def blocking_session(
    config: Config, side: Side, purpose: str, *, read_only: bool = True
) -> Iterator[SyncConn]:
    """:func:`session`, blocking: for a worker thread that relays rows (a blocking COPY costs
    half the CPU per row of an asynchronous one)."""
    backend, dsn = database_of(config, side)
    try:
        conn = psycopg.connect(
            dsn, autocommit=True, application_name=f"bascule {purpose}"[:63], connect_timeout=10
        )
    except psycopg.Error as exc:
        raise _unreachable(backend, exc) from None
    conn.prepare_threshold = None
    try:
        with blocking_reading(backend, "pinning the session settings"):
            for name, value in _settings(read_only):
                conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        yield conn
    finally:
        conn.close()


def failure(backend: str, doing: str, exc: psycopg.Error) -> UpstreamError:
    """A database error as an UpstreamError naming the backend, the step and the SQLSTATE: a
    server's own message may quote a value, so it is never passed on."""
    if isinstance(exc, psycopg.OperationalError):
        return UpstreamUnreachable(
            backend, f"its database failed while {doing} ({type(exc).__name__})"
        )
    if exc.sqlstate is None:
        # Raised by psycopg itself (a query it could not send): about the query, no data.
        return UpstreamError(backend, f"{doing}: {type(exc).__name__}: {exc}")
    return UpstreamError(
        backend, f"its database refused {doing} ({exc.sqlstate} {type(exc).__name__})"
    )


@asynccontextmanager
async def reading(backend: str, doing: str) -> AsyncIterator[None]:
    """Database errors raised inside as :func:`failure`."""
    try:
        yield
    except psycopg.Error as exc:
        raise failure(backend, doing, exc) from None


@contextmanager
def blocking_reading(backend: str, doing: str) -> Iterator[None]:
    """:func:`reading` for blocking sessions."""
    try:
        yield
    except psycopg.Error as exc:
        raise failure(backend, doing, exc) from None


async def discover(conn: Conn, backend: str, side: Side, dataset: str) -> Table:
    """The table named after ``dataset`` on this side, its columns and primary key."""
    async with reading(backend, f"looking up the table {dataset!r}"):
        cur = await conn.execute(
            "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname),"
            " (pg_relation_size(c.oid) / current_setting('block_size')::int)::bigint,"
            " c.reltuples::bigint, current_setting('server_version_num')::int"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.oid = to_regclass(quote_ident(%s)) AND c.relkind IN ('r', 'p')",
            (dataset,),
        )
        found = await cur.fetchone()
        if found is None:
            raise Refused(
                f"{dataset}: no table {dataset!r} in the {side.value}'s database "
                f"(backend {backend}): a dataset's table is named after it"
            )
        oid, qualified, pages, estimate, version = found
        # From here on, names resolve in pg_catalog only (types outside it come qualified).
        await conn.execute("SELECT set_config('search_path', 'pg_catalog, pg_temp', false)")
        # Generated columns came with PostgreSQL 12 (identity columns with 10).
        generated = "a.attgenerated <> ''" if version >= 120000 else "false"
        cur = await conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod),"
            " coalesce(bt.typname, t.typname), coalesce(bt.typtype, t.typtype)::text,"
            " CASE WHEN a.attcollation = 0 THEN NULL ELSE coll.collname END, t.typtype = 'd',"
            f" a.attidentity::text, {generated}"
            " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
            " LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype"
            " LEFT JOIN pg_collation coll ON coll.oid = a.attcollation"
            " WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            (oid,),
        )
        columns = {
            name: Column(name, type_, base, category, collation, domain, identity, generated)
            for name, type_, base, category, collation, domain, identity, generated in (
                await cur.fetchall()
            )
        }
        cur = await conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
            " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s AND i.indisprimary",
            (oid,),
        )
        key = [r[0] for r in await cur.fetchall()]
    if not key:
        raise Refused(
            f"{dataset}: the table {qualified} in the {side.value}'s database (backend "
            f"{backend}) has no primary key: rows cannot be matched across sides without one"
        )
    if len(key) > 1:
        raise Refused(
            f"{dataset}: the table {qualified} in the {side.value}'s database has a primary key "
            f"of {len(key)} columns ({', '.join(key)}): records are named by one key"
        )
    return Table(side, backend, qualified, oid, columns, key[0], pages, estimate, version)


def pair(dataset: str, source: Table, target: Table, seed: int) -> Pair:
    """Both sides' tables: their schema differences, and the columns compared."""
    only_source = tuple(sorted(set(source.columns) - set(target.columns)))
    only_target = tuple(sorted(set(target.columns) - set(source.columns)))
    shared = sorted(set(source.columns) & set(target.columns))
    changed = tuple(
        (c, source.columns[c].type, target.columns[c].type)
        for c in shared
        if source.columns[c].type != target.columns[c].type
    )
    schema = SchemaDiff(only_source, only_target, changed)
    if source.key != target.key:
        raise Refused(
            f"{dataset}: the primary keys differ: {source.key!r} in the source's table, "
            f"{target.key!r} in the target's; rows cannot be matched"
        )
    if source.key_column.type != target.key_column.type:
        raise Refused(
            f"{dataset}: the key {source.key!r} is {source.key_column.type} in the source's "
            f"table and {target.key_column.type} in the target's; rows cannot be matched"
        )
    compared = tuple(c for c in shared if source.columns[c].type == target.columns[c].type)
    return Pair(
        dataset,
        source,
        target,
        schema,
        compared,
        source.key,
        source.key_column.type,
        seed=seed,
    )


async def agree(conns: Sequence[tuple[str, Conn]], seed: int) -> bool:
    """Do both servers hash alike? Hashes of a probe row of common types under the seed (the
    per-type hash functions are stable across versions, but are the platform's). Both must
    also store text in the same encoding, or the same text would be different bytes."""
    probe = (
        "SELECT current_setting('server_encoding'), hash_record_extended(ROW(1::int8, "
        "'é'::text COLLATE \"C\", 2.50::numeric, 'NaN'::numeric, '-Infinity'::numeric, "
        "'2024-03-01 08:15:02.5+00'::timestamptz, '2024-03-01'::date, true, "
        f"'f47ac10b-58cc-4372-a567-0e02b2c3d479'::uuid, '\\x00ff'::bytea), {seed})"
    )
    found = []
    for backend, conn in conns:
        async with reading(backend, "checking how it hashes"):
            if conn.info.server_version < 140000:
                return False  # no hash_record_extended, nor numeric infinities
            try:
                cur = await conn.execute(probe)
            except psycopg.errors.UndefinedFunction:
                return False  # before PostgreSQL 14: no hash_record_extended
            row = await cur.fetchone()
            assert row is not None
            found.append(row)
    encodings = {row[0] for row in found}
    if len(encodings) > 1:
        raise Refused(
            "the two databases store text in different encodings "
            f"({', '.join(sorted(encodings))}): their rows cannot be compared byte for byte"
        )
    return len({row[1] for row in found}) == 1
