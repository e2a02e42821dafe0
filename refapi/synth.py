"""Synthetic pseudonymous rows for each dataset: a pure function of (seed, row count).

Everything, timestamps included, comes from a ``random.Random`` seeded with the seed and the
dataset's name, so two databases seeded alike hold identical rows. The figures are shaped like
the real ones (French tariffs, frequent acts and diagnoses, population-weighted departments)
but no row describes anyone.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TypeVar

T = TypeVar("T")
Row = tuple[object, ...]

_START = date(2023, 1, 1).toordinal()
_DAYS = 731  # 2023 and 2024
_DAY_US = 86_400 * 1_000_000

# (department, weight ~ population in hundreds of thousands)
_DEPARTMENTS = (
    ("75", 21), ("13", 20), ("59", 26), ("69", 19), ("92", 16), ("93", 17), ("94", 14),
    ("33", 17), ("31", 14), ("44", 15), ("06", 11), ("67", 11), ("34", 12), ("62", 15),
    ("76", 12), ("35", 11), ("38", 13), ("78", 14), ("91", 13), ("95", 12), ("77", 14),
    ("57", 10), ("29", 9), ("01", 7), ("63", 7), ("21", 5), ("87", 4), ("23", 1), ("48", 1),
    ("2A", 2), ("2B", 2), ("971", 4), ("972", 4), ("973", 3), ("974", 9), ("976", 3),
)  # fmt: skip

# (code, weight, tariff in cents, coefficient range): NGAP keys are priced per coefficient.
_ACTS = (
    ("G", 30, 2650, (1, 1)), ("CS", 9, 3000, (1, 1)), ("C", 4, 2500, (1, 1)),
    ("APC", 3, 5500, (1, 1)), ("V", 2, 3500, (1, 1)), ("AMI", 14, 315, (1, 4)),
    ("AMK", 6, 216, (7, 10)), ("K", 2, 192, (5, 20)), ("B", 10, 27, (20, 200)),
    ("DEQP003", 4, 1452, (1, 1)), ("ZBQK002", 3, 1995, (1, 1)), ("YYYY600", 2, 4000, (1, 1)),
    ("QZJA002", 1, 3512, (1, 1)), ("BFGA004", 1, 27141, (1, 1)),
    ("JQGD010", 1, 31350, (1, 1)), ("HHFA016", 1, 23580, (1, 1)),
)  # fmt: skip
# Prescriber speciality codes (01 general practice, 03 cardiology...); None: no prescriber.
_SPECIALITIES = (
    ("01", 55), ("03", 5), ("05", 3), ("06", 4), ("07", 4), ("12", 4), ("13", 2),
    ("14", 2), ("15", 5), ("17", 3), (None, 13),
)  # fmt: skip

# (GHM, weight, typical length of stay in days, GHS tariff in euros)
_GHMS = (
    ("05M092", 6, 9, 4210), ("04M053", 5, 12, 5830), ("14Z14A", 8, 4, 2630),
    ("08C241", 4, 6, 5910), ("23Z02Z", 2, 14, 7420), ("28Z04Z", 20, 0, 300),
    ("28Z07Z", 12, 0, 410), ("02C05J", 10, 0, 1510), ("06C091", 3, 3, 2840),
    ("01M304", 3, 11, 6120), ("11M043", 4, 5, 2950), ("09C10J", 5, 0, 980),
)  # fmt: skip
_EXIT_MODES = (("8", 86), ("6", 6), ("7", 5), ("9", 3))

_CAUSES = (
    ("C34.9", 9), ("I21.9", 6), ("I64", 6), ("F03", 7), ("G30.9", 5), ("J18.9", 4),
    ("C18.9", 4), ("C50.9", 3), ("I50.9", 6), ("E14.9", 3), ("X59", 3), ("J44.9", 3),
    ("U07.1", 2), ("C61", 2), ("K70.3", 2), ("C25.9", 3), ("R99", 4), ("X70", 2),
)  # fmt: skip
_SEX_OF_CAUSE = {"C61": "1", "C50.9": "2"}  # prostate, breast: keep the rows plausible
_PLACES = (("hospital", 53), ("home", 24), ("nursing_home", 14), ("public_place", 2), ("other", 7))


def _expand(pairs: Iterable[tuple[T, int]]) -> list[T]:
    """Each value repeated ``weight`` times, so one ``random()`` draw picks by weight."""
    return [value for value, weight in pairs for _ in range(weight)]


def _rng(seed: int, what: str) -> random.Random:
    return random.Random(f"refapi:{seed}:{what}")


def patients(seed: int, count: int) -> list[str]:
    """``count`` pseudonymous patient ids: 'P' and 16 hex digits, the same for every dataset."""
    bits = _rng(seed, "patients").getrandbits
    return [f"P{bits(64):016x}" for _ in range(count)]


def _stamps(rnd: Callable[[], float], event: date) -> tuple[datetime, datetime]:
    """When a record of this event was created (days after it), and last updated."""
    created = datetime(event.year, event.month, event.day, tzinfo=UTC) + timedelta(
        microseconds=int((1 + rnd() * 30) * _DAY_US)
    )
    if rnd() < 0.9:
        return created, created
    return created, created + timedelta(microseconds=int(rnd() * 90 * _DAY_US))


def _money(cents: int) -> Decimal:
    return Decimal(cents).scaleb(-2)


def dcir_rows(seed: int, count: int) -> Iterator[Row]:
    rng = _rng(seed, "dcir")
    rnd, randint = rng.random, rng.randint
    pool = patients(seed, max(1, count // 8))
    acts = _expand((act, act[1]) for act in _ACTS)
    specialities, departments = _expand(_SPECIALITIES), _expand(_DEPARTMENTS)
    n_pool, n_acts, n_spec, n_dep = len(pool), len(acts), len(specialities), len(departments)
    for i in range(1, count + 1):
        code, _, tariff, (low, high) = acts[int(rnd() * n_acts)]
        cents = tariff * (low if low == high else randint(low, high))
        if rnd() < 0.12:  # extra fees (dépassements) on a minority of acts
            cents += int(cents * rnd() * 0.6)
        act_date = date.fromordinal(_START + int(rnd() * _DAYS))
        created, updated = _stamps(rnd, act_date)
        yield (
            i,
            pool[int(rnd() * n_pool)],
            code,
            act_date,
            _money(cents),
            specialities[int(rnd() * n_spec)],
            departments[int(rnd() * n_dep)],
            created,
            updated,
        )


def _hospitals(rng: random.Random, departments: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for dep in sorted(set(departments)):
        tail = 9 - len(dep)
        out[dep] = [f"{dep}{rng.randrange(10**tail):0{tail}d}" for _ in range(rng.randint(2, 12))]
    return out


def pmsi_rows(seed: int, count: int) -> Iterator[Row]:
    rng = _rng(seed, "pmsi")
    rnd = rng.random
    pool = patients(seed, max(1, count // 4))
    ghms = _expand((ghm, ghm[1]) for ghm in _GHMS)
    exits, departments = _expand(_EXIT_MODES), _expand(_DEPARTMENTS)
    hospitals = _hospitals(rng, departments)
    last_day = date.fromordinal(_START + _DAYS - 1)
    for i in range(1, count + 1):
        ghm, _, los, tariff = ghms[int(rnd() * len(ghms))]
        admission = date.fromordinal(_START + int(rnd() * _DAYS))
        stay = 0 if los == 0 else max(1, int(los * (0.4 + rnd() * 1.2)))
        discharge: date | None = admission + timedelta(days=stay)
        exit_mode: str | None = exits[int(rnd() * len(exits))]
        if admission + timedelta(days=stay) > last_day:  # still in hospital at extraction
            discharge, exit_mode = None, None
        dep = departments[int(rnd() * len(departments))]
        finess = hospitals[dep][int(rnd() * len(hospitals[dep]))]
        created, updated = _stamps(rnd, discharge or admission)
        yield (
            i,
            pool[int(rnd() * len(pool))],
            ghm,
            admission,
            discharge,
            finess,
            exit_mode,
            _money(int(tariff * 100 * (0.9 + rnd() * 0.2))),
            dep,
            created,
            updated,
        )


def cepidc_rows(seed: int, count: int) -> Iterator[Row]:
    rng = _rng(seed, "cepidc")
    rnd, gauss = rng.random, rng.gauss
    # One death per patient: the first ``count`` ids of the shared pool, so some of the
    # deceased also have acts and stays in the other datasets.
    pool = patients(seed, count)
    causes, places, departments = _expand(_CAUSES), _expand(_PLACES), _expand(_DEPARTMENTS)
    for i in range(1, count + 1):
        death = date.fromordinal(_START + int(rnd() * _DAYS))
        age = min(110, max(0, int(gauss(79, 13))))
        created, updated = _stamps(rnd, death)
        cause = causes[int(rnd() * len(causes))]
        sex = _SEX_OF_CAUSE.get(cause) or ("1" if rnd() < 0.5 else "2")
        yield (
            i,
            pool[i - 1],
            death,
            cause,
            age,
            sex,
            places[int(rnd() * len(places))],
            departments[int(rnd() * len(departments))],
            created,
            updated,
        )


GENERATORS: dict[str, Callable[[int, int], Iterator[Row]]] = {
    "dcir": dcir_rows,
    "pmsi": pmsi_rows,
    "cepidc": cepidc_rows,
}
