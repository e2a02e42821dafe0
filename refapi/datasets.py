"""The datasets the reference API serves, declared once; every endpoint is generic over them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from refapi.columns import Column, ColumnType

PATIENT = r"P[0-9a-f]{16}"
# Metropolitan departments, Corsica (2A, 2B) and the overseas ones (971 to 976).
DEPARTMENT = r"(0[1-9]|[1-8][0-9]|9[0-5]|2A|2B|97[1-6])"


@dataclass(frozen=True)
class Check:
    """A table constraint, with the sentence a researcher sees when a write breaks it."""

    name: str
    sql: str
    message: str


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its table (named after it) and its columns besides id and the timestamps."""

    name: str
    description: str
    columns: tuple[Column, ...]
    checks: tuple[Check, ...] = ()
    by_name: Mapping[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        every = (ID, *self.columns, CREATED_AT, UPDATED_AT)
        names = [c.name for c in every]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset {self.name}: a column name is declared twice")
        object.__setattr__(self, "by_name", {c.name: c for c in every})

    @property
    def table(self) -> str:
        return f'"{self.name}"'

    @property
    def all_columns(self) -> tuple[Column, ...]:
        """Every column in table order: id, the dataset's own, created_at, updated_at."""
        return (ID, *self.columns, CREATED_AT, UPDATED_AT)

    def names_where(self, flag: str) -> str:
        """``"a, b"``: the columns with ``flag`` set, for error messages."""
        return ", ".join(c.name for c in self.all_columns if getattr(c, flag))

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "description": self.description,
            "columns": [c.describe() for c in self.all_columns],
        }


ID = Column(
    "id",
    ColumnType.ID,
    "server-assigned record id",
    filterable=True,
    server_set=True,
)
CREATED_AT = Column(
    "created_at",
    ColumnType.TIMESTAMP,
    "when the record was created; set by the server unless a PUT carries it",
    filterable=True,
    server_set=True,
)
UPDATED_AT = Column(
    "updated_at",
    ColumnType.TIMESTAMP,
    "when the record last changed; set by the server unless a PUT carries it",
    filterable=True,
    server_set=True,
)


def _patient() -> Column:
    return Column("patient_id", ColumnType.TEXT, "pseudonymous patient id", pattern=PATIENT)


def _department(description: str) -> Column:
    return Column(
        "department",
        ColumnType.TEXT,
        description,
        filterable=True,
        groupable=True,
        pattern=DEPARTMENT,
    )


DCIR = DatasetSpec(
    "dcir",
    "reimbursed acts and consultations (DCIR)",
    (
        _patient(),
        Column(
            "act_code",
            ColumnType.TEXT,
            "CCAM act code (e.g. DEQP003) or NGAP letter key (e.g. G, CS, AMI)",
            filterable=True,
            groupable=True,
            pattern=r"[A-Z]{4}[0-9]{3}|[A-Z]{1,3}",
        ),
        Column("act_date", ColumnType.DATE, "date of the act", filterable=True, groupable=True),
        Column(
            "amount",
            ColumnType.MONEY,
            "amount reimbursed-basis, in euros",
            filterable=True,
            summable=True,
        ),
        Column(
            "prescriber_speciality",
            ColumnType.TEXT,
            "speciality code of the prescriber (01 general practice...), null if none",
            nullable=True,
            filterable=True,
            groupable=True,
            pattern=r"[0-9]{2}",
        ),
        _department("department of the practitioner"),
    ),
)

PMSI = DatasetSpec(
    "pmsi",
    "hospital stays (PMSI MCO)",
    (
        _patient(),
        Column(
            "ghm",
            ColumnType.TEXT,
            "diagnosis-related group (GHM), e.g. 05M092",
            filterable=True,
            groupable=True,
            pattern=r"[0-9]{2}[CKMZ][0-9]{2}[1-4A-DEJTZ]",
        ),
        Column(
            "admission_date", ColumnType.DATE, "admission date", filterable=True, groupable=True
        ),
        Column(
            "discharge_date",
            ColumnType.DATE,
            "discharge date, null while the stay goes on",
            nullable=True,
            filterable=True,
        ),
        Column(
            "finess",
            ColumnType.TEXT,
            "FINESS number of the hospital",
            filterable=True,
            groupable=True,
            pattern=r"[0-9]{9}|2[AB][0-9]{7}",
        ),
        Column(
            "exit_mode",
            ColumnType.TEXT,
            "mode of exit: 6 ward transfer, 7 hospital transfer, 8 home, 9 death; null while open",
            nullable=True,
            filterable=True,
            groupable=True,
            pattern=r"[6-9]",
        ),
        Column(
            "tariff",
            ColumnType.MONEY,
            "stay tariff (GHS), in euros",
            filterable=True,
            summable=True,
        ),
        _department("department of the hospital"),
    ),
    checks=(
        Check(
            "pmsi_stay_dates",
            "discharge_date IS NULL OR discharge_date >= admission_date",
            "discharge_date must not be before admission_date",
        ),
        Check(
            "pmsi_open_stay",
            "(discharge_date IS NULL) = (exit_mode IS NULL)",
            "exit_mode is set exactly when discharge_date is",
        ),
    ),
)

CEPIDC = DatasetSpec(
    "cepidc",
    "causes of death (CepiDc)",
    (
        _patient(),
        Column("death_date", ColumnType.DATE, "date of death", filterable=True, groupable=True),
        Column(
            "icd10",
            ColumnType.TEXT,
            "underlying cause of death, ICD-10 (e.g. I21.9)",
            filterable=True,
            groupable=True,
            pattern=r"[A-Z][0-9]{2}(\.[0-9]{1,2})?",
        ),
        Column(
            "age",
            ColumnType.INTEGER,
            "age at death, in years",
            filterable=True,
            groupable=True,
            summable=True,
            minimum=0,
            maximum=130,
        ),
        Column(
            "sex",
            ColumnType.TEXT,
            "1 male, 2 female",
            filterable=True,
            groupable=True,
            pattern=r"[12]",
        ),
        Column(
            "place_of_death",
            ColumnType.TEXT,
            "home, hospital, nursing_home, public_place or other",
            filterable=True,
            groupable=True,
            pattern=r"home|hospital|nursing_home|public_place|other",
        ),
        _department("department of residence"),
    ),
)

DATASETS: Mapping[str, DatasetSpec] = {spec.name: spec for spec in (DCIR, PMSI, CEPIDC)}
