"""Seeding: the same seed and size give identical rows in any database, timestamps included."""

from __future__ import annotations

import asyncpg
import pytest

from refapi.datasets import DATASETS, DEPARTMENT, PATIENT
from refapi.seed import seed_database
from refapi.synth import GENERATORS
from tests.conftest import MakeDatabase


async def _digests(url: str) -> dict[str, tuple[int, str, int]]:
    """Per dataset: row count, md5 of every row in id order, and the next id the sequence gives."""
    conn = await asyncpg.connect(url)
    try:
        out = {}
        for name in DATASETS:
            rows = await conn.fetchrow(
                f"SELECT count(*), md5(string_agg(t::text, '|' ORDER BY id)) FROM {name} t"
            )
            # Read the sequence without drawing from it.
            seq = await conn.fetchrow(f"SELECT last_value, is_called FROM {name}_id_seq")
            assert rows is not None and seq is not None
            next_id = seq["last_value"] + 1 if seq["is_called"] else seq["last_value"]
            out[name] = (rows["count"], rows["md5"] or "", next_id)
        return out
    finally:
        await conn.close()


async def test_same_seed_same_rows_in_two_databases(make_database: MakeDatabase) -> None:
    a, b, c = [await make_database(label) for label in ("a", "b", "c")]
    await seed_database(a, 300, seed=5)
    await seed_database(b, 300, seed=5)
    await seed_database(c, 300, seed=6)
    da, db, dc = await _digests(a), await _digests(b), await _digests(c)
    assert da == db
    for name in DATASETS:
        assert da[name][0] == 300 and da[name][2] == 301  # ids 1..N, sequence past N
        assert da[name][1] != dc[name][1]  # another seed, other rows
    # Re-seeding replaces: same figures again, not 600 rows.
    await seed_database(a, 300, seed=5)
    assert await _digests(a) == db


async def test_rows_are_plausible(pg_url: str) -> None:
    await seed_database(pg_url, 500, seed=2)
    conn = await asyncpg.connect(pg_url)
    try:
        for name in DATASETS:
            bad = await conn.fetchval(
                f"SELECT count(*) FROM {name} WHERE patient_id !~ $1 OR department !~ $2 "
                "OR updated_at < created_at",
                f"^{PATIENT}$",
                f"^{DEPARTMENT}$",
            )
            assert bad == 0, name
            assert await conn.fetchval(f"SELECT min(id) = 1 AND max(id) = 500 FROM {name}")
        # Patients recur across acts, as real care pathways do; every death is another patient.
        assert await conn.fetchval("SELECT count(DISTINCT patient_id) FROM dcir") < 500
        assert await conn.fetchval("SELECT count(DISTINCT patient_id) FROM cepidc") == 500
        assert await conn.fetchval("SELECT count(DISTINCT act_code) FROM dcir") > 8
        assert await conn.fetchval("SELECT count(*) FROM cepidc WHERE icd10='C61' AND sex='2'") == 0
    finally:
        await conn.close()


async def test_subset_and_empty_seeding(pg_url: str) -> None:
    await seed_database(pg_url, 20, seed=1, datasets=["pmsi"])
    await seed_database(pg_url, 0, seed=1, datasets=["cepidc"])
    digests = await _digests(pg_url)
    assert digests["pmsi"][0] == 20 and digests["dcir"][0] == 0
    assert digests["cepidc"][0] == 0 and digests["cepidc"][2] == 1
    with pytest.raises(ValueError, match="unknown dataset sniiram"):
        await seed_database(pg_url, 1, datasets=["sniiram"])


async def test_seeding_forgets_the_dataset_idempotency_keys(pg_url: str) -> None:
    await seed_database(pg_url, 5)
    conn = await asyncpg.connect(pg_url)
    try:
        for dataset, key in (("dcir", "k-dcir"), ("pmsi", "k-pmsi")):
            await conn.execute(
                "INSERT INTO idempotency_keys (key, dataset, fingerprint, status) "
                "VALUES ($1, $2, '', 201)",
                key,
                dataset,
            )
        await seed_database(pg_url, 5, datasets=["dcir"])
        assert await conn.fetchval("SELECT array_agg(key) FROM idempotency_keys") == ["k-pmsi"]
    finally:
        await conn.close()


def test_generators_are_pure_functions_of_seed_and_size() -> None:
    for generate in GENERATORS.values():
        assert list(generate(9, 50)) == list(generate(9, 50))
        assert list(generate(9, 50)) != list(generate(10, 50))
