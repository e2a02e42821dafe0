"""Record endpoints: read one, page through all, create, upsert, patch, delete."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from refapi.seed import seed_database
from tests.conftest import MakeDatabase
from tests.refapi.conftest import (
    SEEDED_ROWS,
    Client,
    MakeClient,
    body,
    dcir_record,
    error_of,
    pmsi_record,
)

DCIR = "/v1/datasets/dcir/records"


async def test_get_answers_the_stored_row(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    resp = await seeded.get(f"{DCIR}/7")
    assert resp.status == 200
    payload = await body(resp)
    assert set(payload) == {"record", "served_at"}
    record = payload["record"]
    row = await db.fetchrow("SELECT * FROM dcir WHERE id = 7")
    assert row is not None
    assert record["id"] == 7
    assert record["patient_id"] == row["patient_id"]
    assert record["act_date"] == row["act_date"].isoformat()
    assert Decimal(str(record["amount"])) == row["amount"]
    assert datetime.fromisoformat(record["created_at"]) == row["created_at"]
    assert list(record) == [
        "id",
        "patient_id",
        "act_code",
        "act_date",
        "amount",
        "prescriber_speciality",
        "department",
        "created_at",
        "updated_at",
    ]


async def test_get_absent_record_is_404_naming_it(seeded: Client) -> None:
    error = await error_of(await seeded.get(f"{DCIR}/{SEEDED_ROWS + 1}"), 404)
    assert error["code"] == "record_not_found"
    assert str(SEEDED_ROWS + 1) in error["message"] and "dcir" in error["message"]


async def test_paging_covers_every_row_exactly_once(pg_url: str, make_client: MakeClient) -> None:
    await seed_database(pg_url, 257, seed=4, datasets=["pmsi"])
    client = await make_client()
    seen: list[int] = []
    after: int | None = 0
    pages = 0
    while after is not None:
        resp = await client.get("/v1/datasets/pmsi/records", params={"after": after, "limit": 50})
        assert resp.status == 200
        payload = await body(resp)
        ids = [r["id"] for r in payload["records"]]
        assert ids == sorted(ids) and len(ids) <= 50
        seen.extend(ids)
        after = payload["next_after"]
        if after is not None:
            assert after == ids[-1]
        pages += 1
    assert seen == list(range(1, 258))
    assert pages == 6  # 5 full pages and 7 rows: no trailing empty page


async def test_paging_defaults_to_100_and_ends_with_null(
    pg_url: str, make_client: MakeClient
) -> None:
    await seed_database(pg_url, 150, seed=4, datasets=["cepidc"])
    client = await make_client()
    first = await body(await client.get("/v1/datasets/cepidc/records"))
    assert len(first["records"]) == 100 and first["next_after"] == 100
    second = await body(await client.get("/v1/datasets/cepidc/records?after=100"))
    assert [r["id"] for r in second["records"]] == list(range(101, 151))
    assert second["next_after"] is None
    exact = await body(await client.get("/v1/datasets/cepidc/records?after=50&limit=100"))
    assert len(exact["records"]) == 100 and exact["next_after"] is None


async def test_post_creates_with_the_next_id_and_server_timestamps(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    before = datetime.now(UTC)
    resp = await seeded.post(DCIR, json=dcir_record(prescriber_speciality=None))
    assert resp.status == 201
    payload = await body(resp)
    assert set(payload) == {"record", "served_at"}
    record = payload["record"]
    assert record["id"] == SEEDED_ROWS + 1
    assert record["prescriber_speciality"] is None
    assert record["created_at"] == record["updated_at"]
    assert datetime.fromisoformat(record["created_at"]) >= before.replace(microsecond=0)
    row = await db.fetchrow("SELECT * FROM dcir WHERE id = $1", SEEDED_ROWS + 1)
    assert row is not None
    assert row["amount"] == Decimal("26.50") and row["act_code"] == "G"
    assert row["created_at"] == datetime.fromisoformat(record["created_at"])


async def test_post_defaults_absent_nullable_fields_to_null(seeded: Client) -> None:
    record = dcir_record()
    del record["prescriber_speciality"]
    resp = await seeded.post(DCIR, json=record)
    assert resp.status == 201
    assert (await body(resp))["record"]["prescriber_speciality"] is None


async def test_put_replaces_keeping_created_at(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    old = (await body(await seeded.get(f"{DCIR}/3")))["record"]
    resp = await seeded.put(f"{DCIR}/3", json=dcir_record(amount=99.99))
    assert resp.status == 200
    record = (await body(resp))["record"]
    assert record["id"] == 3 and record["amount"] == 99.99
    assert record["created_at"] == old["created_at"]
    assert record["updated_at"] > old["updated_at"]
    assert await db.fetchval("SELECT amount FROM dcir WHERE id = 3") == Decimal("99.99")
    assert await db.fetchval("SELECT count(*) FROM dcir") == SEEDED_ROWS


async def test_put_creates_an_absent_id_with_201(seeded: Client) -> None:
    resp = await seeded.put(f"{DCIR}/{SEEDED_ROWS + 3}", json=dcir_record())
    assert resp.status == 201
    record = (await body(resp))["record"]
    assert record["id"] == SEEDED_ROWS + 3
    assert record["created_at"] == record["updated_at"]
    again = await seeded.put(f"{DCIR}/{SEEDED_ROWS + 3}", json=dcir_record(act_code="CS"))
    assert again.status == 200
    assert (await body(again))["record"]["act_code"] == "CS"


async def test_put_stores_given_timestamps_as_given(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    given = dcir_record(
        id=5, created_at="2023-05-01T10:11:12.123456+02:00", updated_at="2023-06-01T00:00:00Z"
    )
    resp = await seeded.put(f"{DCIR}/5", json=given)
    assert resp.status == 200
    record = (await body(resp))["record"]
    assert record["created_at"] == "2023-05-01T08:11:12.123456Z"
    assert record["updated_at"] == "2023-06-01T00:00:00.000000Z"
    row = await db.fetchrow("SELECT created_at, updated_at FROM dcir WHERE id = 5")
    assert row is not None
    assert row["created_at"] == datetime(2023, 5, 1, 8, 11, 12, 123456, tzinfo=UTC)
    assert row["updated_at"] == datetime(2023, 6, 1, tzinfo=UTC)


async def test_put_does_not_advance_the_sequence(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    n = SEEDED_ROWS
    assert (await seeded.put(f"{DCIR}/{n + 5}", json=dcir_record())).status == 201
    created = await body(await seeded.post(DCIR, json=dcir_record()))
    assert created["record"]["id"] == n + 1  # not n + 6
    for expected in (n + 2, n + 3, n + 4):
        resp = await seeded.post(DCIR, json=dcir_record())
        assert (await body(resp))["record"]["id"] == expected
    # The sequence now draws the id the PUT took, as a real Postgres-backed API would.
    error = await error_of(await seeded.post(DCIR, json=dcir_record()), 409)
    assert error["code"] == "id_conflict"
    assert "sequence" in error["message"]
    assert (await body(await seeded.post(DCIR, json=dcir_record())))["record"]["id"] == n + 6
    assert await db.fetchval("SELECT count(*) FROM dcir") == n + 6


async def test_put_of_a_stored_answer_reproduces_the_row_elsewhere(
    pg_url: str, make_client: MakeClient, make_database: MakeDatabase
) -> None:
    """What a dual-write replay does: the authority's answer, PUT as is, gives an identical row."""
    target_url = await make_database("target")
    source = await make_client(name="source")
    target = await make_client(name="target", database_url=target_url)
    created = await body(await source.post(DCIR, json=dcir_record(amount=12.3)))
    record_id = created["record"]["id"]
    resp = await target.put(f"{DCIR}/{record_id}", json=created)  # the whole answer, as is
    assert resp.status == 201
    assert (await body(resp))["record"] == created["record"]
    patched = await body(await source.patch(f"{DCIR}/{record_id}", json={"amount": 7.05}))
    # ... or just the record it holds.
    assert (await target.put(f"{DCIR}/{record_id}", json=patched["record"])).status == 200
    digests = []
    for url in (pg_url, target_url):
        conn = await asyncpg.connect(url)
        try:
            digests.append(
                await conn.fetchval("SELECT md5(d::text) FROM dcir d WHERE id = $1", record_id)
            )
        finally:
            await conn.close()
    assert digests[0] is not None and digests[0] == digests[1]


async def test_put_with_another_id_in_the_body_is_refused(seeded: Client) -> None:
    error = await error_of(await seeded.put(f"{DCIR}/4", json=dcir_record(id=5)), 422)
    assert error["code"] == "id_mismatch"
    assert error["message"].startswith("id:")


async def test_patch_changes_given_fields_and_stamps_updated_at(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    old = (await body(await seeded.get(f"{DCIR}/9")))["record"]
    resp = await seeded.patch(f"{DCIR}/9", json={"amount": 31.0, "department": "2A"})
    assert resp.status == 200
    record = (await body(resp))["record"]
    assert record["amount"] == 31.0 and record["department"] == "2A"
    assert record["act_code"] == old["act_code"] and record["patient_id"] == old["patient_id"]
    assert record["created_at"] == old["created_at"]
    assert record["updated_at"] > old["updated_at"]
    row = await db.fetchrow("SELECT amount, department FROM dcir WHERE id = 9")
    assert row is not None and tuple(row) == (Decimal("31.00"), "2A")


async def test_patch_of_an_absent_record_is_404(seeded: Client) -> None:
    error = await error_of(await seeded.patch(f"{DCIR}/999", json={"amount": 1}), 404)
    assert error["code"] == "record_not_found"


async def test_patch_breaking_a_constraint_is_422_naming_it(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    created = await body(await seeded.post("/v1/datasets/pmsi/records", json=pmsi_record()))
    url = f"/v1/datasets/pmsi/records/{created['record']['id']}"
    error = await error_of(await seeded.patch(url, json={"discharge_date": "2024-01-01"}), 422)
    assert error["code"] == "constraint_violated"
    assert "discharge_date" in error["message"] and "admission_date" in error["message"]
    error = await error_of(await seeded.patch(url, json={"exit_mode": None}), 422)
    assert error["code"] == "constraint_violated" and "exit_mode" in error["message"]
    stored = await db.fetchval(
        "SELECT discharge_date::text FROM pmsi WHERE id = $1", created["record"]["id"]
    )
    assert stored == "2024-02-09"
    # An open stay (no discharge, no exit mode) is fine.
    ok = await seeded.patch(url, json={"discharge_date": None, "exit_mode": None})
    assert ok.status == 200


async def test_delete_removes_then_404s(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    resp = await seeded.delete("/v1/datasets/cepidc/records/2")
    assert resp.status == 204
    assert await resp.read() == b""
    assert await db.fetchval("SELECT count(*) FROM cepidc WHERE id = 2") == 0
    assert await db.fetchval("SELECT count(*) FROM cepidc") == SEEDED_ROWS - 1
    assert (await seeded.get("/v1/datasets/cepidc/records/2")).status == 404
    error = await error_of(await seeded.delete("/v1/datasets/cepidc/records/2"), 404)
    assert error["code"] == "record_not_found"
