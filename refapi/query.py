"""Aggregate reads (``POST …/query``): a body checked against the spec, then parameterised SQL.

Only identifiers taken from the spec reach the SQL text; every value is a bind parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from refapi.columns import Column, ColumnType
from refapi.datasets import DatasetSpec
from refapi.errors import Unprocessable

# As in SQL, a comparison with a null column is not true: ``ne`` leaves out the nulls too.
OPERATORS: Mapping[str, str] = {
    "eq": "=",
    "ne": "<>",
    "lt": "<",
    "lte": "<=",
    "gt": ">",
    "gte": ">=",
    "in": "= ANY",
}
AGGREGATES = ("sum", "avg", "min", "max")
MAX_METRICS = 10
MAX_IN_VALUES = 1000
MAX_GROUPS = 10_000
_KEYS = ("group_by", "metrics", "filters")


@dataclass(frozen=True)
class Metric:
    """``count`` or ``AGG:column``; answered under ``count`` or ``AGG_column``."""

    aggregate: str
    column: Column | None = None

    @property
    def output(self) -> str:
        return "count" if self.column is None else f"{self.aggregate}_{self.column.name}"

    @property
    def sql(self) -> str:
        return "count(*)" if self.column is None else f"{self.aggregate}({self.column.ident})"


@dataclass(frozen=True)
class Filter:
    column: Column
    operator: str
    value: object


@dataclass(frozen=True)
class AggregateQuery:
    spec: DatasetSpec
    group_by: Column | None
    metrics: tuple[Metric, ...]
    filters: tuple[Filter, ...]


def parse_query(spec: DatasetSpec, body: Mapping[str, object]) -> AggregateQuery:
    unknown = sorted(k for k in body if k not in _KEYS)
    if unknown:
        raise Unprocessable(
            "invalid_query",
            f"unknown key {unknown[0][:64]!r} in query; expected {', '.join(_KEYS)}",
        )
    return AggregateQuery(
        spec,
        _group_by(spec, body.get("group_by")),
        _metrics(spec, body.get("metrics", ["count"])),
        _filters(spec, body.get("filters", {})),
    )


def _column(spec: DatasetSpec, name: str, flag: str, code: str, label: str) -> Column:
    column = spec.by_name.get(name)
    if column is None:
        raise Unprocessable(code, f"{label}: unknown column {name[:64]!r} in dataset {spec.name}")
    if not getattr(column, flag):
        raise Unprocessable(
            code,
            f"{label}: column {name!r} is not {flag}; {flag} columns of {spec.name} are "
            f"{spec.names_where(flag)}",
        )
    return column


def _group_by(spec: DatasetSpec, raw: object) -> Column | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise Unprocessable("invalid_group_by", "group_by: expected a column name or null")
    return _column(spec, raw, "groupable", "invalid_group_by", "group_by")


def _metrics(spec: DatasetSpec, raw: object) -> tuple[Metric, ...]:
    if not isinstance(raw, list) or not raw or len(raw) > MAX_METRICS:
        raise Unprocessable(
            "invalid_metric", f"metrics: expected a list of 1 to {MAX_METRICS} metric names"
        )
    metrics: list[Metric] = []
    for i, item in enumerate(raw):
        label = f"metrics[{i}]"
        if not isinstance(item, str):
            raise Unprocessable("invalid_metric", f"{label}: expected a string")
        if item == "count":
            metric = Metric("count")
        else:
            aggregate, sep, name = item.partition(":")
            if not sep or aggregate not in AGGREGATES:
                raise Unprocessable(
                    "invalid_metric",
                    f"{label}: expected 'count' or AGG:column with AGG one of "
                    f"{', '.join(AGGREGATES)}",
                )
            column = _column(spec, name, "summable", "invalid_metric", label)
            metric = Metric(aggregate, column)
        if metric in metrics:
            raise Unprocessable("invalid_metric", f"{label}: {metric.output} is asked twice")
        metrics.append(metric)
    return tuple(metrics)


def _filters(spec: DatasetSpec, raw: object) -> tuple[Filter, ...]:
    if not isinstance(raw, dict):
        raise Unprocessable("invalid_filter", "filters: expected an object of column: {op: value}")
    filters: list[Filter] = []
    for name, ops in raw.items():
        column = _column(spec, name, "filterable", "invalid_filter", "filters")
        label = f"filters.{column.name}"
        if not isinstance(ops, dict) or not ops:
            raise Unprocessable(
                "invalid_filter", f'{label}: expected an object such as {{"eq": value}}'
            )
        for op, value in ops.items():
            if op not in OPERATORS:
                raise Unprocessable(
                    "invalid_operator",
                    f"{label}: unknown operator {op[:16]!r}; expected one of "
                    f"{', '.join(OPERATORS)}",
                )
            filters.append(Filter(column, op, _filter_value(column, op, value, f"{label}.{op}")))
    return tuple(filters)


def _filter_value(column: Column, op: str, raw: object, label: str) -> object:
    if raw is None:
        raise Unprocessable("invalid_value", f"{label}: null cannot be compared")
    if op != "in":
        return column.parse(raw, label)
    if not isinstance(raw, list) or not raw or len(raw) > MAX_IN_VALUES:
        raise Unprocessable(
            "invalid_value", f"{label}: expected a list of 1 to {MAX_IN_VALUES} values"
        )
    values = []
    for i, item in enumerate(raw):
        if item is None:
            raise Unprocessable("invalid_value", f"{label}[{i}]: null cannot be compared")
        values.append(column.parse(item, f"{label}[{i}]"))
    return values


def _collated(column: Column) -> str:
    # Text compares and sorts byte-wise, so two databases with different default collations
    # give the same groups in the same order.
    return f'{column.ident} COLLATE "C"' if column.type is ColumnType.TEXT else column.ident


def to_sql(query: AggregateQuery) -> tuple[str, list[object]]:
    """The statement and its arguments; at most ``MAX_GROUPS + 1`` rows, to detect overflow."""
    args: list[object] = []
    conditions: list[str] = []
    for f in query.filters:
        args.append(f.value)
        cast = f"::{f.column.type.sql}[]" if f.operator == "in" else ""
        rhs = f"(${len(args)}{cast})" if f.operator == "in" else f"${len(args)}"
        conditions.append(f"{_collated(f.column)} {OPERATORS[f.operator]} {rhs}")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    outputs = [f'{m.sql} AS "{m.output}"' for m in query.metrics]
    if query.group_by is None:
        return f"SELECT {', '.join(outputs)} FROM {query.spec.table}{where}", args
    key = query.group_by.ident
    return (
        f"SELECT {key} AS key, {', '.join(outputs)} FROM {query.spec.table}{where} "
        f"GROUP BY {key} ORDER BY {_collated(query.group_by)} LIMIT {MAX_GROUPS + 1}",
        args,
    )


def render_groups(query: AggregateQuery, rows: Sequence[Mapping[str, object]]) -> list[object]:
    if len(rows) > MAX_GROUPS:
        raise Unprocessable(
            "too_many_groups",
            f"more than {MAX_GROUPS} groups; filter more narrowly or group by another column",
        )
    groups: list[object] = []
    for row in rows:
        group: dict[str, object] = {
            "key": query.group_by.render(row["key"]) if query.group_by is not None else None
        }
        for m in query.metrics:
            value = row[m.output]
            group[m.output] = m.column.render(value) if m.column is not None else value
        groups.append(group)
    return groups
