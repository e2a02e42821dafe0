"""Idempotency keys: a repeat gets the first answer and changes nothing; reuse elsewhere is 422."""

from __future__ import annotations

import asyncio

import asyncpg

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


def key(k: str) -> dict[str, str]:
    return {"Idempotency-Key": k}


async def test_repeated_post_returns_the_first_answer_and_creates_once(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    first = await seeded.post(DCIR, json=dcir_record(), headers=key("k-post"))
    assert first.status == 201
    assert "Idempotency-Replayed" not in first.headers
    again = await seeded.post(DCIR, json=dcir_record(), headers=key("k-post"))
    assert again.status == 201
    assert again.headers["Idempotency-Replayed"] == "true"
    assert await again.read() == await first.read()  # served_at included: the same body
    assert await db.fetchval("SELECT count(*) FROM dcir") == SEEDED_ROWS + 1
    stored = await db.fetchrow("SELECT dataset, status FROM idempotency_keys WHERE key = 'k-post'")
    assert stored is not None and tuple(stored) == ("dcir", 201)


async def test_repeated_patch_changes_nothing_even_after_a_later_write(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    url = f"{DCIR}/3"
    first = await seeded.patch(url, json={"amount": 10}, headers=key("k-patch"))
    assert first.status == 200
    assert (await seeded.patch(url, json={"amount": 20})).status == 200
    again = await seeded.patch(url, json={"amount": 10}, headers=key("k-patch"))
    assert again.status == 200 and again.headers["Idempotency-Replayed"] == "true"
    assert (await body(again))["record"]["amount"] == 10
    assert await db.fetchval("SELECT amount::text FROM dcir WHERE id = 3") == "20.00"


async def test_repeated_put_and_delete_replay_their_status(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    url = f"{DCIR}/{SEEDED_ROWS + 10}"
    assert (await seeded.put(url, json=dcir_record(), headers=key("k-put"))).status == 201
    replay = await seeded.put(url, json=dcir_record(), headers=key("k-put"))
    assert replay.status == 201  # the first answer, though a fresh PUT would now say 200
    assert replay.headers["Idempotency-Replayed"] == "true"
    assert (await seeded.delete(url, headers=key("k-del"))).status == 204
    replay = await seeded.delete(url, headers=key("k-del"))
    assert replay.status == 204  # not 404: the repeat gets the first answer
    assert replay.headers["Idempotency-Replayed"] == "true"
    assert await db.fetchval("SELECT count(*) FROM dcir WHERE id = $1", SEEDED_ROWS + 10) == 0


async def test_repeated_put_and_patch_get_the_first_body_byte_for_byte(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    # The answer is stored as the record written and its served_at: what a repeat sends is
    # rendered again from them, timestamps and amounts spelled as the first time.
    url = f"{DCIR}/{SEEDED_ROWS + 20}"
    record = dcir_record(amount=1234567.8, prescriber_speciality=None)
    stamped = {**record, "created_at": "2024-01-02T03:04:05+02:00"}
    put = await seeded.put(url, json=stamped, headers=key("k-put-bytes"))
    patch = await seeded.patch(url, json={"amount": 0.1}, headers=key("k-patch-bytes"))
    assert put.status == 201 and patch.status == 200
    await asyncio.sleep(0.01)  # a repeat's served_at would differ if it were made anew
    again_put = await seeded.put(url, json=stamped, headers=key("k-put-bytes"))
    again_patch = await seeded.patch(url, json={"amount": 0.1}, headers=key("k-patch-bytes"))
    assert again_put.headers["Idempotency-Replayed"] == "true"
    assert again_patch.headers["Idempotency-Replayed"] == "true"
    assert await again_put.read() == await put.read()
    assert await again_patch.read() == await patch.read()
    assert (await body(again_put))["record"]["created_at"] == "2024-01-02T01:04:05.000000Z"
    assert await db.fetchval("SELECT amount::text FROM dcir WHERE id = $1", SEEDED_ROWS + 20) == (
        "0.10"
    )


async def test_concurrent_patches_with_one_key_apply_once(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    url = f"{DCIR}/5"
    answers = await asyncio.gather(
        *(seeded.patch(url, json={"amount": 7}, headers=key("k-race-patch")) for _ in range(6))
    )
    assert {r.status for r in answers} == {200}
    assert len({await r.read() for r in answers}) == 1
    assert sum(r.headers.get("Idempotency-Replayed") == "true" for r in answers) == 5
    stored = await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE key = 'k-race-patch'")
    assert stored == 1


async def test_key_reused_for_another_request_is_422(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    before = await body(await seeded.get(f"{DCIR}/1"))
    assert (await seeded.post(DCIR, json=dcir_record(), headers=key("k-1"))).status == 201
    refused = [
        await seeded.post(DCIR, json=dcir_record(amount=1.0), headers=key("k-1")),
        await seeded.post("/v1/datasets/pmsi/records", json=pmsi_record(), headers=key("k-1")),
        await seeded.put(f"{DCIR}/1", json=dcir_record(), headers=key("k-1")),
    ]
    for resp in refused:
        error = await error_of(resp, 422)
        assert error["code"] == "idempotency_key_reused"
        assert "Idempotency-Key" in error["message"]
    assert await db.fetchval("SELECT count(*) FROM dcir") == SEEDED_ROWS + 1
    assert await db.fetchval("SELECT count(*) FROM pmsi") == SEEDED_ROWS
    after = await body(await seeded.get(f"{DCIR}/1"))
    assert after["record"] == before["record"]


async def test_a_failed_write_leaves_its_key_unused(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    missing = await seeded.patch(f"{DCIR}/999", json={"amount": 1}, headers=key("k-fail"))
    assert missing.status == 404
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0
    # Corrected and sent again under the same key, it applies.
    fixed = await seeded.patch(f"{DCIR}/2", json={"amount": 1}, headers=key("k-fail"))
    assert fixed.status == 200 and "Idempotency-Replayed" not in fixed.headers
    assert await db.fetchval("SELECT amount::text FROM dcir WHERE id = 2") == "1.00"


async def test_concurrent_requests_with_one_key_apply_once(
    seeded: Client, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    answers = await asyncio.gather(
        *(seeded.post(DCIR, json=dcir_record(), headers=key("k-race")) for _ in range(6))
    )
    bodies = {await r.read() for r in answers}
    assert len(bodies) == 1
    assert {r.status for r in answers} == {201}
    assert sum(r.headers.get("Idempotency-Replayed") == "true" for r in answers) == 5
    assert await db.fetchval("SELECT count(*) FROM dcir") == SEEDED_ROWS + 1


async def test_ignored_keys_apply_every_repeat(
    seeded: Client, make_client: MakeClient, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    careless = await make_client(honour_idempotency=False)
    first = await body(await careless.post(DCIR, json=dcir_record(), headers=key("k-twice")))
    again = await careless.post(DCIR, json=dcir_record(), headers=key("k-twice"))
    assert again.status == 201 and "Idempotency-Replayed" not in again.headers
    assert (await body(again))["record"]["id"] == first["record"]["id"] + 1
    assert await db.fetchval("SELECT count(*) FROM dcir") == SEEDED_ROWS + 2
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0


async def test_overlong_key_is_400(seeded: Client) -> None:
    resp = await seeded.post(DCIR, json=dcir_record(), headers=key("k" * 256))
    error = await error_of(resp, 400)
    assert error["code"] == "invalid_idempotency_key"
    assert "Idempotency-Key" in error["message"]
