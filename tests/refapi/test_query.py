"""Aggregate reads, checked against SQL written independently of the API's own."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import pytest

from refapi.query import AggregateQuery, parse_query, to_sql
from refapi.seed import seed_database
from tests.refapi.conftest import Client, MakeClient, body, error_of

ROWS = 2000


@pytest.fixture
async def big(pg_url: str, make_client: MakeClient) -> Client:
    await seed_database(pg_url, ROWS, seed=11)
    return await make_client()


async def _query(client: Client, dataset: str, payload: object) -> list[dict[str, object]]:
    resp = await client.post(f"/v1/datasets/{dataset}/query", json=payload)
    answer = await body(resp)
    assert resp.status == 200, answer
    assert set(answer) == {"groups", "served_at"}
    groups: list[dict[str, object]] = answer["groups"]
    return groups


def _decimal(value: object) -> Decimal:
    assert isinstance(value, int | float)
    return Decimal(repr(value))


async def test_grouped_count_and_sum_with_filters_match_sql(
    big: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    groups = await _query(
        big,
        "dcir",
        {
            "group_by": "act_code",
            "metrics": ["count", "sum:amount"],
            "filters": {
                "act_date": {"gte": "2024-01-01", "lt": "2024-07-01"},
                "department": {"in": ["75", "13", "59", "69", "92", "93"]},
            },
        },
    )
    expected = await db.fetch(
        """SELECT act_code, count(*) AS n, sum(amount) AS total FROM dcir
           WHERE act_date >= '2024-01-01' AND act_date < '2024-07-01'
             AND department IN ('75', '13', '59', '69', '92', '93')
           GROUP BY act_code"""
    )
    assert len(expected) > 5
    assert [g["key"] for g in groups] == sorted(r["act_code"] for r in expected)  # byte order
    by_key = {r["act_code"]: r for r in expected}
    for group in groups:
        row = by_key[group["key"]]
        assert set(group) == {"key", "count", "sum_amount"}
        assert group["count"] == row["n"]
        assert _decimal(group["sum_amount"]) == row["total"]


async def test_without_group_by_one_group_holds_the_totals(
    big: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    groups = await _query(
        big, "pmsi", {"metrics": ["count", "sum:tariff"], "filters": {"exit_mode": {"ne": "8"}}}
    )
    row = await db.fetchrow("SELECT count(*), sum(tariff) FROM pmsi WHERE exit_mode <> '8'")
    assert row is not None
    assert groups == [{"key": None, "count": row[0], "sum_tariff": float(row[1])}]
    empty = await _query(big, "pmsi", {"filters": {"id": {"gt": ROWS}}})
    assert empty == [{"key": None, "count": 0}]


async def test_avg_min_max_and_integer_filters_match_sql(
    big: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    groups = await _query(
        big,
        "cepidc",
        {
            "group_by": "sex",
            "metrics": ["count", "avg:age", "min:age", "max:age", "sum:age"],
            "filters": {"age": {"gte": 40, "lte": 95}, "icd10": {"in": ["I21.9", "C34.9"]}},
        },
    )
    rows = await db.fetch(
        """SELECT sex, count(*), avg(age), min(age), max(age), sum(age) FROM cepidc
           WHERE age BETWEEN 40 AND 95 AND icd10 IN ('I21.9', 'C34.9')
           GROUP BY sex ORDER BY sex"""
    )
    assert [g["key"] for g in groups] == [r["sex"] for r in rows] == ["1", "2"]
    for group, row in zip(groups, rows, strict=True):
        assert group["count"] == row["count"]
        assert group["avg_age"] == pytest.approx(float(row["avg"]))
        assert (group["min_age"], group["max_age"], group["sum_age"]) == tuple(row[3:6])


async def test_grouping_by_a_nullable_column_puts_null_last(
    big: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    groups = await _query(big, "dcir", {"group_by": "prescriber_speciality"})
    nulls = await db.fetchval("SELECT count(*) FROM dcir WHERE prescriber_speciality IS NULL")
    assert nulls > 0
    assert groups[-1] == {"key": None, "count": nulls}
    assert sum(g["count"] for g in groups) == ROWS  # type: ignore[misc]


async def test_grouping_by_date_renders_iso_keys(
    big: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    groups = await _query(
        big,
        "pmsi",
        {"group_by": "admission_date", "filters": {"admission_date": {"lt": "2023-01-10"}}},
    )
    rows = await db.fetch(
        "SELECT admission_date::text AS d, count(*) FROM pmsi "
        "WHERE admission_date < '2023-01-10' GROUP BY 1 ORDER BY 1"
    )
    assert groups == [{"key": r["d"], "count": r["count"]} for r in rows]
    assert len(groups) > 3


BAD_QUERIES: list[tuple[object, str, str]] = [
    ({"group_by": "amount"}, "invalid_group_by", "amount"),
    ({"group_by": "colour"}, "invalid_group_by", "colour"),
    ({"group_by": 3}, "invalid_group_by", "group_by"),
    ({"metrics": ["sum:act_code"]}, "invalid_metric", "act_code"),
    ({"metrics": ["median:amount"]}, "invalid_metric", "metrics[0]"),
    ({"metrics": []}, "invalid_metric", "metrics"),
    ({"metrics": ["count", "count"]}, "invalid_metric", "metrics[1]"),
    ({"filters": {"patient_id": {"eq": "P0000000000000000"}}}, "invalid_filter", "patient_id"),
    ({"filters": {"nope": {"eq": 1}}}, "invalid_filter", "nope"),
    ({"filters": {"act_date": "2024-01-01"}}, "invalid_filter", "filters.act_date"),
    ({"filters": {"act_date": {"like": "2024%"}}}, "invalid_operator", "like"),
    ({"filters": {"act_date": {"gte": "01/02/2024"}}}, "invalid_value", "act_date.gte"),
    ({"filters": {"amount": {"lt": "12"}}}, "invalid_value", "filters.amount.lt"),
    ({"filters": {"department": {"in": []}}}, "invalid_value", "department.in"),
    ({"filters": {"department": {"in": ["75", 92]}}}, "invalid_value", "department.in[1]"),
    ({"filters": {"department": {"eq": None}}}, "invalid_value", "department.eq"),
    ({"having": {}}, "invalid_query", "having"),
]


async def test_bad_queries_are_422_naming_the_culprit(api: Client) -> None:
    for payload, code, named in BAD_QUERIES:
        error = await error_of(await api.post("/v1/datasets/dcir/query", json=payload), 422)
        assert error["code"] == code, (payload, error)
        assert named in error["message"], (payload, error)


def test_sql_carries_values_only_as_parameters() -> None:
    from refapi.datasets import DCIR

    hostile = "75'; DROP TABLE dcir; --"
    query: AggregateQuery = parse_query(
        DCIR,
        {
            "group_by": "department",
            "filters": {"act_code": {"eq": "G"}, "act_date": {"gte": "2024-01-01"}},
        },
    )
    sql, args = to_sql(query)
    assert "$1" in sql and "$2" in sql and "2024" not in sql and "'G'" not in sql
    assert args[0] == "G" and str(args[1]) == "2024-01-01"
    with pytest.raises(Exception, match="pattern"):
        parse_query(DCIR, {"filters": {"department": {"eq": hostile}}})
