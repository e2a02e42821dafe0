"""The HTTP endpoints: each parses its input, calls the store, and shapes the JSON answer."""

from __future__ import annotations

import re

from aiohttp import web

from refapi import idempotency, store
from refapi.columns import MAX_ID
from refapi.datasets import DATASETS, DatasetSpec
from refapi.errors import BadRequest, NotFound
from refapi.query import parse_query
from refapi.records import parse_create, parse_patch, parse_replace
from refapi.responses import Answer, json_response, read_object
from refapi.state import POOL, SETTINGS

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_PAGE_PARAMS = ("after", "limit")
# Bounded length: int() of a long digit string is slow, and of a very long one an error.
_INTEGER = re.compile(r"-?[0-9]{1,19}")


def _dataset(request: web.Request) -> DatasetSpec:
    name = request.match_info["dataset"]
    spec = DATASETS.get(name)
    if spec is None:
        raise NotFound(
            "unknown_dataset",
            f"unknown dataset {name[:64]!r}; known: {', '.join(sorted(DATASETS))}",
        )
    return spec


def _record_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not _INTEGER.fullmatch(raw) or not 0 < int(raw) <= MAX_ID:
        raise BadRequest("invalid_id", f"record id: expected an integer from 1 to {MAX_ID}")
    return int(raw)


def _int_param(request: web.Request, name: str, default: int, lowest: int, highest: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not _INTEGER.fullmatch(raw) or not lowest <= int(raw) <= highest:
        raise BadRequest(
            "invalid_parameter", f"{name}: expected an integer from {lowest} to {highest}"
        )
    return int(raw)


def _served_at(claim: store.Claim | None) -> str | None:
    """A keyed write's answer carries the ``served_at`` its key recorded with it."""
    return claim.served_at if claim is not None else None


def _not_found(spec: DatasetSpec, record_id: int) -> NotFound:
    return NotFound("record_not_found", f"no record {record_id} in {spec.name}")


async def healthz(request: web.Request) -> web.Response:
    await request.app[POOL].fetchval("SELECT 1", timeout=5)
    return json_response({"status": "ok", "name": request.app[SETTINGS].name})


async def list_datasets(request: web.Request) -> web.Response:
    return json_response({"datasets": [spec.describe() for spec in DATASETS.values()]})


async def list_records(request: web.Request) -> web.Response:
    spec = _dataset(request)
    unknown = sorted(k for k in request.query if k not in _PAGE_PARAMS)
    if unknown:
        raise BadRequest(
            "invalid_parameter", f"{unknown[0][:64]}: unknown parameter; expected after, limit"
        )
    after = _int_param(request, "after", 0, 0, MAX_ID)
    limit = _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    async with request.app[POOL].acquire() as conn:
        records = await store.page(conn, spec, after, limit)
    more = len(records) > limit
    records = records[:limit]
    return json_response({"records": records, "next_after": records[-1]["id"] if more else None})


async def get_record(request: web.Request) -> web.Response:
    spec = _dataset(request)
    record_id = _record_id(request)
    async with request.app[POOL].acquire() as conn:
        record = await store.get(conn, spec, record_id)
    if record is None:
        raise _not_found(spec, record_id)
    return json_response({"record": record})


async def create_record(request: web.Request) -> web.Response:
    spec = _dataset(request)
    raw, body = await read_object(request)
    values = parse_create(spec, body)

    async def action(conn: store.Conn, claim: store.Claim | None) -> Answer:
        record = await store.create(conn, spec, values, claim)
        return Answer.json(201, {"record": record}, _served_at(claim))

    return await idempotency.perform(request, spec.name, raw, action)


async def replace_record(request: web.Request) -> web.Response:
    spec = _dataset(request)
    record_id = _record_id(request)
    raw, body = await read_object(request)
    values = parse_replace(spec, body, record_id)

    async def action(conn: store.Conn, claim: store.Claim | None) -> Answer:
        record, created = await store.upsert(conn, spec, record_id, values, claim)
        return Answer.json(201 if created else 200, {"record": record}, _served_at(claim))

    return await idempotency.perform(request, spec.name, raw, action)


async def patch_record(request: web.Request) -> web.Response:
    spec = _dataset(request)
    record_id = _record_id(request)
    raw, body = await read_object(request)
    values = parse_patch(spec, body)

    async def action(conn: store.Conn, claim: store.Claim | None) -> Answer:
        record = await store.patch(conn, spec, record_id, values, claim)
        if record is None:
            raise _not_found(spec, record_id)
        return Answer.json(200, {"record": record}, _served_at(claim))

    return await idempotency.perform(request, spec.name, raw, action)


async def delete_record(request: web.Request) -> web.Response:
    spec = _dataset(request)
    record_id = _record_id(request)
    raw = await request.read()

    async def action(conn: store.Conn, claim: store.Claim | None) -> Answer:
        if not await store.delete(conn, spec, record_id, claim):
            raise _not_found(spec, record_id)
        return Answer(204)

    return await idempotency.perform(request, spec.name, raw, action)


async def query(request: web.Request) -> web.Response:
    spec = _dataset(request)
    _, body = await read_object(request)
    parsed = parse_query(spec, body)
    async with request.app[POOL].acquire() as conn:
        groups = await store.aggregate(conn, parsed)
    return json_response({"groups": groups})


def add_routes(app: web.Application) -> None:
    records = "/v1/datasets/{dataset}/records"
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/datasets", list_datasets)
    app.router.add_get(records, list_records)
    app.router.add_post(records, create_record)
    app.router.add_get(records + "/{id}", get_record)
    app.router.add_put(records + "/{id}", replace_record)
    app.router.add_patch(records + "/{id}", patch_record)
    app.router.add_delete(records + "/{id}", delete_record)
    app.router.add_post("/v1/datasets/{dataset}/query", query)
