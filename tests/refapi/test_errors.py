"""Bad input is a 4xx JSON error naming what is wrong, never a 500; a real 500 leaks no value."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from pytest_aiohttp.plugin import AiohttpClient

from refapi.app import MAX_BODY_BYTES, create_app
from refapi.state import POOL
from tests.refapi.conftest import (
    AUTH,
    RESEARCHER,
    SEEDED_ROWS,
    Client,
    dcir_record,
    error_of,
)

DCIR = "/v1/datasets/dcir/records"


UNREADABLE = [
    (b"{not json", "malformed_json", "not valid JSON"),
    (b"", "malformed_json", "empty"),
    (b"[1, 2]", "invalid_body", "got an array"),
    (b'"text"', "invalid_body", "got a scalar"),
    (b'{"record": [1]}', "invalid_body", "record"),
]


async def test_unreadable_bodies_are_400(api: Client) -> None:
    for data, code, named in UNREADABLE:
        for method, url in (("POST", DCIR), ("PUT", f"{DCIR}/1"), ("PATCH", f"{DCIR}/1")):
            error = await error_of(await api.request(method, url, data=data), 400)
            assert error["code"] == code, (method, data, error)
            assert named in error["message"], (method, data, error)


INVALID_RECORDS = [
    (dcir_record(colour="blue"), "unknown_field", "'colour'"),
    ({"patient_id": "P00112233445566ff"}, "missing_field", "act_code, act_date, amount"),
    (dcir_record(amount="12.50"), "invalid_value", "amount: expected an amount"),
    (dcir_record(amount=True), "invalid_value", "amount: expected an amount"),
    (dcir_record(amount=12.345), "invalid_value", "amount"),
    (dcir_record(amount=1e9), "invalid_value", "amount: must be below"),
    (dcir_record(act_date="2024-02-30"), "invalid_value", "act_date"),
    (dcir_record(act_date=20240214), "invalid_value", "act_date: expected a date"),
    (dcir_record(patient_id="Jean Dupont"), "invalid_value", "patient_id: does not match"),
    (dcir_record(department=None), "invalid_value", "department: must not be null"),
    (dcir_record(act_code=""), "invalid_value", "act_code"),
    (dcir_record(id=3), "read_only_field", "id"),
    (dcir_record(created_at="2024-01-01T00:00:00Z"), "read_only_field", "created_at"),
]


async def test_invalid_records_are_422_naming_the_field(api: Client) -> None:
    for record, code, named in INVALID_RECORDS:
        error = await error_of(await api.post(DCIR, json=record), 422)
        assert error["code"] == code, (record, error)
        assert named in error["message"], (record, error)
        # The message names the field and what was expected, never the value sent.
        assert "Dupont" not in error["message"]


async def test_put_and_patch_validate_their_fields(api: Client) -> None:
    cases: list[tuple[str, dict[str, object], str, str]] = [
        ("PUT", {"act_code": "G"}, "missing_field", "patient_id"),
        ("PUT", dcir_record(created_at="2024-01-01T00:00:00"), "invalid_value", "created_at"),
        ("PATCH", {}, "missing_field", "nothing to change"),
        ("PATCH", {"updated_at": "x"}, "read_only_field", "updated_at"),
        ("PATCH", {"amount": "x"}, "invalid_value", "amount"),
        ("PATCH", {"ghm": "05M092"}, "unknown_field", "'ghm'"),
    ]
    for method, payload, code, named in cases:
        error = await error_of(await api.request(method, f"{DCIR}/2", json=payload), 422)
        assert error["code"] == code, (method, payload, error)
        assert named in error["message"], (method, payload, error)


async def test_unknown_dataset_is_404_naming_it(api: Client) -> None:
    for method, url in (
        ("GET", "/v1/datasets/sniiram/records"),
        ("GET", "/v1/datasets/sniiram/records/1"),
        ("POST", "/v1/datasets/sniiram/query"),
        ("DELETE", "/v1/datasets/sniiram/records/1"),
    ):
        error = await error_of(await api.request(method, url, json={}), 404)
        assert error["code"] == "unknown_dataset"
        assert "'sniiram'" in error["message"] and "dcir" in error["message"]


async def test_bad_ids_are_400(api: Client) -> None:
    for bad_id in ("abc", "0", "-4", "1.5", "99999999999999999999", "\u0661\u0662"):
        for method in ("GET", "PUT", "PATCH", "DELETE"):
            resp = await api.request(method, f"{DCIR}/{bad_id}", json=dcir_record())
            error = await error_of(resp, 400)
            assert error["code"] == "invalid_id", (method, bad_id)
            assert error["message"].startswith("record id")


async def test_bad_paging_parameters_are_400(api: Client) -> None:
    for query, named in (
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("after=-1", "after"),
        ("after=1e3", "after"),
        ("sort=id", "sort"),
    ):
        error = await error_of(await api.get(f"{DCIR}?{query}"), 400)
        assert error["code"] == "invalid_parameter", query
        assert error["message"].startswith(named), (query, error)


async def test_body_too_large_is_413(seeded: Client) -> None:
    huge = b'{"patient_id": "' + b"P" * MAX_BODY_BYTES + b'"}'
    error = await error_of(await seeded.post(DCIR, data=huge), 413)
    assert error["code"] == "body_too_large"
    assert str(MAX_BODY_BYTES) in error["message"]


async def test_unknown_routes_and_methods_are_json(seeded: Client) -> None:
    error = await error_of(await seeded.get("/v2/everything"), 404)
    assert error["code"] == "not_found"
    resp = await seeded.post(f"{DCIR}/1", json={})
    error = await error_of(resp, 405)
    assert error["code"] == "method_not_allowed"
    assert "PUT" in resp.headers["Allow"] and "POST" in error["message"]


async def test_unexpected_failures_are_json_500_and_log_no_values(
    pg_url: str, aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "P" + "0123456789abcdef"

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError(f"Key (patient_id)=({secret}) leaked")

    app = create_app("t-api", pg_url, [RESEARCHER])
    app.router.add_get("/v1/boom", boom)
    client = await aiohttp_client(app, headers=AUTH)
    with caplog.at_level(logging.INFO, logger="refapi"):
        resp = await client.get(f"/v1/boom?patient={secret}")
        error = await error_of(resp, 500)
    assert error["code"] == "internal_error"
    assert resp.headers["X-Served-By"] == "t-api"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "RuntimeError" in logged and "/v1/boom" in logged
    assert secret not in logged


async def test_lost_database_is_503(seeded: Client) -> None:
    await seeded.app[POOL].close()
    for url in ("/healthz", f"{DCIR}/1"):
        error = await error_of(await seeded.get(url), 503)
        assert error["code"] == "database_unavailable"


async def test_access_log_names_route_templates_not_urls(
    seeded: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="refapi.access"):
        await seeded.get(f"{DCIR}/{SEEDED_ROWS}?x=1")
        await seeded.patch(f"{DCIR}/3", json={"department": "2B"})
    lines = [r.getMessage() for r in caplog.records if r.name == "refapi.access"]
    assert lines[0].startswith("GET /v1/datasets/{dataset}/records/{id} 200")
    assert lines[1].startswith("PATCH /v1/datasets/{dataset}/records/{id} 200")
    assert not any(str(SEEDED_ROWS) in line.split()[1] or "2B" in line for line in lines)
