"""A dataset column: its SQL type, what it may be used for, and how its values cross JSON."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation

from refapi.errors import Unprocessable

MAX_ID = 2**63 - 1
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_MONEY_LIMIT = Decimal(10) ** 8  # numeric(10,2): eight digits before the point
_CENT = Decimal("0.01")


class ColumnType(enum.Enum):
    """The JSON-facing type of a column; ``value`` is the name shown by ``GET /v1/datasets``."""

    ID = "id"
    TEXT = "text"
    DATE = "date"
    MONEY = "money"
    INTEGER = "integer"
    TIMESTAMP = "timestamp"

    @property
    def sql(self) -> str:
        return _SQL_TYPES[self]


_SQL_TYPES = {
    ColumnType.ID: "bigint",
    ColumnType.TEXT: "text",
    ColumnType.DATE: "date",
    ColumnType.MONEY: "numeric(10,2)",
    ColumnType.INTEGER: "integer",
    ColumnType.TIMESTAMP: "timestamptz",
}


@dataclass(frozen=True)
class Column:
    """One column of a dataset. Flags say what the generic endpoints may do with it."""

    name: str
    type: ColumnType
    description: str = ""
    nullable: bool = False
    filterable: bool = False
    groupable: bool = False
    summable: bool = False
    server_set: bool = False
    pattern: str | None = None
    minimum: int | None = None
    maximum: int | None = None

    def __post_init__(self) -> None:
        # Names are spliced into SQL as quoted identifiers: only the spec supplies them, and
        # this keeps even the spec from supplying something that needs escaping.
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"column name {self.name!r}: lower-case letters, digits and '_'")
        if self.summable and self.type not in (ColumnType.MONEY, ColumnType.INTEGER):
            raise ValueError(f"column {self.name}: only money and integer columns are summable")

    @property
    def ident(self) -> str:
        return f'"{self.name}"'

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "type": self.type.value,
            "description": self.description,
            "nullable": self.nullable,
            "filterable": self.filterable,
            "groupable": self.groupable,
            "summable": self.summable,
            "server_set": self.server_set,
        }

    def parse(self, raw: object, label: str | None = None) -> object:
        """The Python value for a JSON value, or ``Unprocessable`` naming ``label`` (the field)."""
        label = label or self.name
        if raw is None:
            if self.nullable:
                return None
            raise Unprocessable("invalid_value", f"{label}: must not be null")
        return _PARSERS[self.type](self, raw, label)

    def render(self, value: object) -> object:
        """The JSON value for a value read from Postgres."""
        if value is None:
            return None
        if isinstance(value, datetime):
            return format_timestamp(value)
        if isinstance(value, date):
            return value.isoformat()
        if isinstance(value, Decimal):
            # Two decimals and at most ten digits: a float carries it exactly enough that its
            # shortest repr is the stored figure.
            return float(value)
        return value


def format_timestamp(value: datetime) -> str:
    """An instant as ``2024-03-01T08:15:02.123456Z``: one spelling, whatever the server's zone."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json_type(raw: object) -> str:
    if isinstance(raw, bool):
        return "a boolean"
    if isinstance(raw, int | float):
        return "a number"
    if isinstance(raw, str):
        return "a string"
    if isinstance(raw, list):
        return "an array"
    if isinstance(raw, dict):
        return "an object"
    return "null"


def _wrong(label: str, expected: str, raw: object) -> Unprocessable:
    return Unprocessable("invalid_value", f"{label}: expected {expected}, got {_json_type(raw)}")


def _parse_int(column: Column, raw: object, label: str, lowest: int, highest: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise _wrong(label, "an integer", raw)
    if not lowest <= raw <= highest:
        raise Unprocessable(
            "invalid_value", f"{label}: must be between {lowest} and {highest}, got {raw}"
        )
    return raw


def _parse_id(column: Column, raw: object, label: str) -> int:
    return _parse_int(column, raw, label, 1, MAX_ID)


def _parse_integer(column: Column, raw: object, label: str) -> int:
    lowest = column.minimum if column.minimum is not None else -(2**31)
    highest = column.maximum if column.maximum is not None else 2**31 - 1
    return _parse_int(column, raw, label, lowest, highest)


def _parse_text(column: Column, raw: object, label: str) -> str:
    if not isinstance(raw, str):
        raise _wrong(label, "a string", raw)
    if not raw or len(raw) > 200:
        raise Unprocessable("invalid_value", f"{label}: must be 1 to 200 characters long")
    if column.pattern is not None and not re.fullmatch(column.pattern, raw):
        raise Unprocessable(
            "invalid_value", f"{label}: does not match the pattern {column.pattern}"
        )
    return raw


def _parse_date(column: Column, raw: object, label: str) -> date:
    expected = "a date as 'YYYY-MM-DD'"
    if not isinstance(raw, str):
        raise _wrong(label, expected, raw)
    try:
        if not _DATE.fullmatch(raw):
            raise ValueError(raw)
        return date.fromisoformat(raw)
    except ValueError:
        raise Unprocessable(
            "invalid_value", f"{label}: expected {expected}, got a string that is not one"
        ) from None


def _parse_money(column: Column, raw: object, label: str) -> Decimal:
    expected = "an amount in euros (a number with at most 2 decimals)"
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _wrong(label, expected, raw)
    try:
        # repr is the shortest spelling that reads back as the same float: 12.3 -> "12.3",
        # whereas Decimal(12.3) would be the binary expansion 12.300000000000000710...
        amount = Decimal(repr(raw)) if isinstance(raw, float) else Decimal(raw)
    except InvalidOperation:
        raise _wrong(label, expected, raw) from None
    if abs(amount) >= _MONEY_LIMIT:
        raise Unprocessable("invalid_value", f"{label}: must be below 100000000 in absolute value")
    if amount.quantize(_CENT) != amount:
        raise Unprocessable("invalid_value", f"{label}: expected {expected}, got more decimals")
    return amount


def _parse_timestamp(column: Column, raw: object, label: str) -> datetime:
    expected = "an ISO 8601 timestamp with a time zone"
    if not isinstance(raw, str):
        raise _wrong(label, expected, raw)
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise Unprocessable(
            "invalid_value", f"{label}: expected {expected}, got a string that is not one"
        ) from None
    if value.tzinfo is None:
        raise Unprocessable("invalid_value", f"{label}: expected {expected}, got one without")
    return value.astimezone(UTC)


_PARSERS = {
    ColumnType.ID: _parse_id,
    ColumnType.TEXT: _parse_text,
    ColumnType.DATE: _parse_date,
    ColumnType.MONEY: _parse_money,
    ColumnType.INTEGER: _parse_integer,
    ColumnType.TIMESTAMP: _parse_timestamp,
}
