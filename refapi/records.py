"""Record bodies in and out: validated against a dataset spec, rendered from a stored row.

A write body is a record object, or the envelope ``{"record": {...}, "served_at": ...}`` the API
answers with, so a proxy can replay a stored answer as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import orjson

from refapi.columns import Column, ColumnType, format_timestamp
from refapi.datasets import CREATED_AT, ID, UPDATED_AT, DatasetSpec
from refapi.errors import BadRequest, Unprocessable


@dataclass(frozen=True)
class RecordValues:
    """Validated values for the dataset's own columns, plus timestamps a PUT may carry."""

    values: Mapping[str, object]
    created_at: datetime | None = None
    updated_at: datetime | None = None


def parse_create(spec: DatasetSpec, body: Mapping[str, object]) -> RecordValues:
    """A POST body: every required column; ids and timestamps are the server's to set."""
    fields = _unwrap(body)
    _refuse_unknown(spec, fields)
    _refuse_server_set(spec, fields)
    return RecordValues(_full(spec, fields))


def parse_replace(spec: DatasetSpec, body: Mapping[str, object], record_id: int) -> RecordValues:
    """A PUT body: the full record; ``id`` may repeat the path's, timestamps are kept if given."""
    fields = _unwrap(body)
    _refuse_unknown(spec, fields)
    if "id" in fields and ID.parse(fields["id"]) != record_id:
        raise Unprocessable("id_mismatch", "id: differs from the id in the path")
    created = fields.get("created_at")
    updated = fields.get("updated_at")
    return RecordValues(
        _full(spec, fields),
        created_at=None if created is None else _timestamp(CREATED_AT, created),
        updated_at=None if updated is None else _timestamp(UPDATED_AT, updated),
    )


def parse_patch(spec: DatasetSpec, body: Mapping[str, object]) -> RecordValues:
    """A PATCH body: some of the dataset's own columns, at least one."""
    fields = _unwrap(body)
    _refuse_unknown(spec, fields)
    _refuse_server_set(spec, fields)
    if not fields:
        names = ", ".join(c.name for c in spec.columns)
        raise Unprocessable("missing_field", f"nothing to change: give one or more of {names}")
    return RecordValues({c.name: c.parse(fields[c.name]) for c in spec.columns if c.name in fields})


def render(spec: DatasetSpec, row: Mapping[str, object]) -> dict[str, object]:
    """A stored row as the JSON record the API answers with, in table column order."""
    return {c.name: c.render(row[c.name]) for c in spec.all_columns}


def rendered(spec: DatasetSpec, stored: str) -> dict[str, object]:
    """What :func:`render` made of a row, from the row as Postgres' ``to_jsonb`` stored it
    (an idempotency key's answer): the same values, spelled the same."""
    values = orjson.loads(stored)
    return {c.name: _from_json(c, values[c.name]) for c in spec.all_columns}


def _from_json(column: Column, value: object) -> object:
    if value is None:
        return None
    if column.type is ColumnType.TIMESTAMP:
        assert isinstance(value, str)
        return format_timestamp(datetime.fromisoformat(value))
    if column.type is ColumnType.MONEY:
        # numeric(10,2) as a JSON number: the float nearest to it, as render() gives.
        assert isinstance(value, int | float)
        return float(value)
    return value  # ids and integers are numbers, dates ISO strings, texts strings


def _unwrap(body: Mapping[str, object]) -> Mapping[str, object]:
    # A whole answer may come back, served_at and all; served_at says nothing about the record.
    if "record" in body and set(body) <= {"record", "served_at"}:
        inner = body["record"]
        if not isinstance(inner, dict):
            raise BadRequest("invalid_body", "record: must be a JSON object")
        return inner
    return body


def _refuse_unknown(spec: DatasetSpec, fields: Mapping[str, object]) -> None:
    unknown = sorted(name for name in fields if name not in spec.by_name)
    if unknown:
        shown = ", ".join(repr(name[:64]) for name in unknown[:5])
        raise Unprocessable(
            "unknown_field",
            f"unknown field {shown} for dataset {spec.name}; "
            f"its fields are {', '.join(spec.by_name)}",
        )


def _refuse_server_set(spec: DatasetSpec, fields: Mapping[str, object]) -> None:
    for column in spec.all_columns:
        if column.server_set and column.name in fields:
            raise Unprocessable(
                "read_only_field",
                f"{column.name}: set by the server; only a PUT to /records/{{id}} may carry it",
            )


def _full(spec: DatasetSpec, fields: Mapping[str, object]) -> dict[str, object]:
    missing = [c.name for c in spec.columns if c.name not in fields and not c.nullable]
    if missing:
        raise Unprocessable("missing_field", f"missing field {', '.join(missing)}")
    return {c.name: c.parse(fields.get(c.name)) for c in spec.columns}


def _timestamp(column: Column, raw: object) -> datetime:
    value = column.parse(raw)
    assert isinstance(value, datetime)
    return value
