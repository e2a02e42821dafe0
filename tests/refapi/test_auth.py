"""Bearer tokens guard every /v1 route; /healthz stays open; no tokens, no server."""

from __future__ import annotations

import asyncpg
import pytest

from refapi.app import create_app
from refapi.auth import TokenSet, parse_tokens
from tests.refapi.conftest import SEEDED_ROWS, SERVICE, Client, MakeClient, dcir_record, error_of

ROUTES = [
    ("GET", "/v1/datasets"),
    ("GET", "/v1/datasets/dcir/records"),
    ("GET", "/v1/datasets/dcir/records/1"),
    ("POST", "/v1/datasets/dcir/records"),
    ("PUT", "/v1/datasets/dcir/records/1"),
    ("PATCH", "/v1/datasets/dcir/records/1"),
    ("DELETE", "/v1/datasets/dcir/records/1"),
    ("POST", "/v1/datasets/dcir/query"),
    ("GET", "/v1/no-such-route"),
]


async def test_every_v1_route_wants_a_token(
    seeded: Client, make_client: MakeClient, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    anonymous = await make_client(headers={})
    for method, url in ROUTES:
        resp = await anonymous.request(method, url, json=dcir_record())
        error = await error_of(resp, 401)
        assert error["code"] == "missing_token", (method, url)
        assert "Authorization: Bearer" in error["message"]
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    # Nothing was written by the refused writes.
    assert await db.fetchval("SELECT count(*) FROM dcir") == SEEDED_ROWS
    assert await db.fetchval("SELECT count(*) FROM dcir WHERE id = 1") == 1


async def test_wrong_or_malformed_credentials_are_401(
    seeded: Client, make_client: MakeClient
) -> None:
    cases = [
        ({"Authorization": "Bearer not-a-token"}, "invalid_token"),
        ({"Authorization": f"Bearer {SERVICE}x"}, "invalid_token"),
        ({"Authorization": f"Basic {SERVICE}"}, "missing_token"),
        ({"Authorization": "Bearer "}, "missing_token"),
        ({"Authorization": SERVICE}, "missing_token"),
    ]
    for headers, code in cases:
        client = await make_client(headers=headers)
        resp = await client.get("/v1/datasets")
        error = await error_of(resp, 401)
        assert error["code"] == code, headers
        assert "Bearer" in resp.headers["WWW-Authenticate"]
        if code == "invalid_token":
            assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


async def test_each_configured_token_is_accepted(seeded: Client, make_client: MakeClient) -> None:
    service = await make_client(headers={"Authorization": f"bearer {SERVICE}"})
    assert (await service.get("/v1/datasets/dcir/records/1")).status == 200
    assert (await seeded.get("/v1/datasets/dcir/records/1")).status == 200


async def test_healthz_needs_no_token(make_client: MakeClient) -> None:
    anonymous = await make_client(headers={})
    assert (await anonymous.get("/healthz")).status == 200


def test_no_tokens_no_app() -> None:
    for tokens in ([], ["", "  "]):
        with pytest.raises(ValueError, match="BASCULE_API_TOKENS"):
            create_app("x", "postgresql://nowhere/db", tokens)
    with pytest.raises(ValueError, match="whitespace"):
        TokenSet(["two words"])


def test_token_set_matches_exact_tokens_only() -> None:
    tokens = TokenSet(parse_tokens(" alpha, beta ,,"))
    assert len(tokens) == 2
    assert tokens.admits("alpha") and tokens.admits("beta")
    assert not tokens.admits("alph") and not tokens.admits("alpha ") and not tokens.admits("")
