"""Journal bodies sealed at rest, and records named by keyed hashes. Pure: no I/O.

Journal bodies are health data: they are sealed with AES-256-GCM (``cryptography``), each with
a fresh 96-bit nonce and bound to its dataset and field as associated data, so a ciphertext
cannot be moved to another row or field unnoticed. A record key never appears in the clear
outside the sealed body: the journal, locks, traces and metrics name it by an HMAC-SHA256 token
under ``BASCULE_HMAC_KEY`` (a plain hash of a low-entropy id would be reversed by trying them).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bascule.errors import BasculeError

_VERSION = b"\x01"
_NONCE = 12
DATASET_WIDE = "*"
"""The record token of a write that names no record: it locks and orders the whole dataset."""


class SealError(BasculeError, ValueError):
    """A sealed value could not be opened: wrong key, or tampered with."""


class Sealer:
    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the journal key must be at least 32 bytes")
        self._aead = AESGCM(key[:32])

    def seal(self, plain: bytes, *, dataset: str, field: str) -> bytes:
        nonce = os.urandom(_NONCE)
        return _VERSION + nonce + self._aead.encrypt(nonce, plain, _aad(dataset, field))

    def open(self, sealed: bytes, *, dataset: str, field: str) -> bytes:
        if not sealed.startswith(_VERSION) or len(sealed) < 1 + _NONCE + 16:
            raise SealError(f"{dataset}/{field}: not a sealed value of a known version")
        nonce, body = sealed[1 : 1 + _NONCE], sealed[1 + _NONCE :]
        try:
            return self._aead.decrypt(nonce, body, _aad(dataset, field))
        except InvalidTag:
            raise SealError(f"{dataset}/{field}: wrong key, or the value was altered") from None


def _aad(dataset: str, field: str) -> bytes:
    return b"bascule-journal\x00" + dataset.encode() + b"\x00" + field.encode()


class Namer:
    """Names records by keyed hashes: stable for one key, meaningless without it."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the HMAC key must be at least 32 bytes")
        self._key = key

    def record(self, dataset: str, key: str | None) -> str:
        """The token of ``key`` in ``dataset`` (32 hex digits), or ``*`` for no key."""
        if key is None:
            return DATASET_WIDE
        # hmac.digest: OpenSSL's one-shot HMAC, the same value as hmac.new(...).digest() without
        # building an HMAC object (a write names its record on every request).
        return hmac.digest(self._key, dataset.encode() + b"\x00" + key.encode(), "sha256")[
            :16
        ].hex()


def fence_id(dataset: str) -> int:
    """The advisory-lock id of a dataset's write fence: every write holds it shared from before
    it reads its plan until its outcome; a change that alters writes holds it exclusively."""
    digest = hashlib.blake2b(f"fence\x00{dataset}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_id(dataset: str, token: str) -> int:
    """A signed 64-bit advisory-lock id for a record token (or the dataset, for ``*``).

    Derived from the token, which is already keyed, so the lock ids say nothing either.
    """
    digest = hashlib.blake2b(f"{dataset}\x00{token}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
