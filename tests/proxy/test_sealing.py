"""Sealing and naming: round trips, tampering, binding to the row's context, no leaks."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bascule.sealing import DATASET_WIDE, Namer, Sealer, SealError, lock_id

KEY = bytes(range(32))


@given(plain=st.binary(max_size=2000), dataset=st.sampled_from(["dcir", "pmsi"]))
def test_sealed_values_open_to_themselves_and_hide_them(plain: bytes, dataset: str) -> None:
    sealer = Sealer(KEY)
    sealed = sealer.seal(plain, dataset=dataset, field="body")
    assert sealer.open(sealed, dataset=dataset, field="body") == plain
    if len(plain) >= 8:
        assert plain not in sealed
    assert sealed != sealer.seal(plain, dataset=dataset, field="body")  # fresh nonce


def test_tampering_the_wrong_key_or_another_context_is_refused() -> None:
    sealer = Sealer(KEY)
    sealed = sealer.seal(b'{"patient_id": "P0123"}', dataset="dcir", field="body")
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for bad, dataset, field, sealer_used in [
        (flipped, "dcir", "body", sealer),
        (sealed, "pmsi", "body", sealer),  # moved to another dataset's row
        (sealed, "dcir", "answer", sealer),  # moved to another field
        (sealed, "dcir", "body", Sealer(os.urandom(32))),
        (b"\x02" + sealed[1:], "dcir", "body", sealer),
    ]:
        with pytest.raises(SealError):
            sealer_used.open(bad, dataset=dataset, field=field)


def test_records_are_named_by_keyed_tokens() -> None:
    namer = Namer(KEY)
    token = namer.record("dcir", "12345")
    assert token == namer.record("dcir", "12345") and len(token) == 32
    assert "12345" not in token
    assert token != namer.record("pmsi", "12345")  # per dataset
    assert token != Namer(os.urandom(32)).record("dcir", "12345")  # meaningless without the key
    assert namer.record("dcir", None) == DATASET_WIDE
    assert lock_id("dcir", token) == lock_id("dcir", token)
    assert lock_id("dcir", token) != lock_id("dcir", DATASET_WIDE)
    assert -(2**63) <= lock_id("dcir", token) < 2**63


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Sealer(b"short")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Namer(b"short")
