"""Bearer tokens: who may call ``/v1``. Tokens come from ``BASCULE_API_TOKENS``, never a file."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from refapi.errors import Unauthorized

TOKENS_ENV = "BASCULE_API_TOKENS"
PROTECTED_PREFIX = "/v1"
_CHALLENGE = 'Bearer realm="refapi"'


class TokenSet:
    """The accepted tokens, kept only as digests and compared in constant time."""

    def __init__(self, tokens: Iterable[str]) -> None:
        cleaned = [t.strip() for t in tokens if t.strip()]
        if not cleaned:
            raise ValueError(
                f"no API tokens configured: set {TOKENS_ENV} to a comma-separated list of "
                "bearer tokens (the researchers' and the service token)"
            )
        if any(any(ch.isspace() for ch in t) for t in cleaned):
            raise ValueError(f"{TOKENS_ENV}: a token contains whitespace")
        self._digests = tuple(_digest(t) for t in cleaned)

    def __len__(self) -> int:
        return len(self._digests)

    def admits(self, presented: str) -> bool:
        # Hashing first makes every comparison the same length; every digest is compared so the
        # time taken says nothing about which token, if any, matched.
        candidate = _digest(presented)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(digest, candidate)
        return found


def parse_tokens(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def middleware(tokens: TokenSet) -> Middleware:
    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/"):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized(
                    "missing_token",
                    "Authorization: Bearer <token> is required",
                    {"WWW-Authenticate": _CHALLENGE},
                )
            if not tokens.admits(token.strip()):
                raise Unauthorized(
                    "invalid_token",
                    "the bearer token is not one this API accepts",
                    {"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
                )
        return await handler(request)

    return require_token
