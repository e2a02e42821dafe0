"""What every answer carries (served_at, X-Request-Id, X-Served-By), /healthz, /v1/datasets."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from refapi.datasets import DATASETS
from tests.refapi.conftest import Client, MakeClient, body


async def test_healthz_names_the_instance(make_client: MakeClient) -> None:
    client = await make_client(name="scaleway-1", headers={})
    resp = await client.get("/healthz")
    assert resp.status == 200
    payload = await body(resp)
    assert payload["status"] == "ok" and payload["name"] == "scaleway-1"
    assert resp.headers["X-Served-By"] == "scaleway-1"


async def test_every_answer_carries_volatile_stamps(seeded: Client) -> None:
    answers = [
        await seeded.get("/v1/datasets"),
        await seeded.get("/v1/datasets"),
        await seeded.get("/v1/datasets/dcir/records/1"),
        await seeded.get("/v1/datasets/dcir/records/999"),
        await seeded.delete("/v1/datasets/dcir/records/1"),
    ]
    ids = {r.headers["X-Request-Id"] for r in answers}
    assert len(ids) == len(answers)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert {r.headers["X-Served-By"] for r in answers} == {"t-api"}
    now = datetime.now(UTC)
    stamps = []
    for resp in answers[:4]:
        stamp = (await body(resp))["served_at"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
        stamps.append(stamp)
        assert abs(datetime.fromisoformat(stamp) - now) < timedelta(seconds=30)
    assert stamps[0] != stamps[1]  # volatile: two identical questions, two stamps
    assert answers[4].status == 204 and await answers[4].read() == b""


async def test_datasets_lists_every_dataset_with_its_columns(api: Client) -> None:
    resp = await api.get("/v1/datasets")
    assert resp.status == 200
    listed = (await body(resp))["datasets"]
    assert [d["name"] for d in listed] == ["dcir", "pmsi", "cepidc"]
    dcir = {c["name"]: c for c in listed[0]["columns"]}
    names = list(dcir)
    assert names[:2] == ["id", "patient_id"] and names[-2:] == ["created_at", "updated_at"]
    assert dcir["amount"] == {
        "name": "amount",
        "type": "money",
        "description": dcir["amount"]["description"],
        "nullable": False,
        "filterable": True,
        "groupable": False,
        "summable": True,
        "server_set": False,
    }
    assert dcir["created_at"]["server_set"] and dcir["prescriber_speciality"]["nullable"]
    for spec, described in zip(DATASETS.values(), listed, strict=True):
        assert [c["name"] for c in described["columns"]] == [c.name for c in spec.all_columns]
        assert described["description"]
