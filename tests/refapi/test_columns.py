"""Column values across JSON, and the specs' own guards: pure, no database."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from refapi.columns import Column, ColumnType
from refapi.datasets import CEPIDC, CREATED_AT, DCIR, PMSI
from refapi.errors import Unprocessable
from refapi.schema import table_ddl

AMOUNT = DCIR.by_name["amount"]
AGE = CEPIDC.by_name["age"]


def test_money_keeps_the_figure_written() -> None:
    assert AMOUNT.parse(12.3) == Decimal("12.3")
    assert AMOUNT.parse(26) == Decimal(26)
    assert AMOUNT.parse(-0.01) == Decimal("-0.01")
    for bad in (0.1 + 0.2, 1.005, True, "3.00", 10**8):
        with pytest.raises(Unprocessable, match="amount"):
            AMOUNT.parse(bad)
    assert AMOUNT.render(Decimal("26.50")) == 26.5


def test_integers_respect_their_bounds_and_are_not_booleans() -> None:
    assert AGE.parse(0) == 0 and AGE.parse(130) == 130
    for bad in (131, -1, True, 80.0, "80"):
        with pytest.raises(Unprocessable, match="age"):
            AGE.parse(bad)


def test_timestamps_need_a_zone_and_come_back_in_utc() -> None:
    paris = timezone(timedelta(hours=2))
    parsed = CREATED_AT.parse("2024-06-01T12:00:00.5+02:00")
    assert parsed == datetime(2024, 6, 1, 10, 0, 0, 500000, tzinfo=UTC)
    assert (
        CREATED_AT.render(datetime(2024, 6, 1, 12, tzinfo=paris)) == "2024-06-01T10:00:00.000000Z"
    )
    with pytest.raises(Unprocessable, match=r"created_at: .* with a time zone, got one without"):
        CREATED_AT.parse("2024-06-01T12:00:00")


def test_dates_are_iso_days_only() -> None:
    act_date = DCIR.by_name["act_date"]
    assert act_date.parse("2024-02-29") == date(2024, 2, 29)
    assert act_date.render(date(2024, 2, 29)) == "2024-02-29"
    for bad in ("2023-02-29", "20240101", "2024-01-01T00:00:00"):
        with pytest.raises(Unprocessable, match="act_date"):
            act_date.parse(bad)


def test_nullability_follows_the_spec() -> None:
    assert DCIR.by_name["prescriber_speciality"].parse(None) is None
    with pytest.raises(Unprocessable, match="must not be null"):
        DCIR.by_name["act_code"].parse(None)


def test_specs_guard_their_own_names_and_flags() -> None:
    with pytest.raises(ValueError, match="lower-case"):
        Column('bad"name', ColumnType.TEXT)
    with pytest.raises(ValueError, match="summable"):
        Column("label", ColumnType.TEXT, summable=True)


def test_table_ddl_carries_types_and_checks() -> None:
    ddl = table_ddl(PMSI)
    assert '"id" bigserial PRIMARY KEY' in ddl
    assert '"tariff" numeric(10,2) NOT NULL' in ddl
    assert '"discharge_date" date,' in ddl  # nullable
    assert 'CONSTRAINT "pmsi_stay_dates" CHECK' in ddl
    assert '"created_at" timestamptz NOT NULL DEFAULT now()' in ddl
