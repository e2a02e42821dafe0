"""The frames between a proxy and its shadow worker: what goes in comes out, and a broken or
oversized frame is an error that names it, never a guess."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import msgspec
import pytest
from multidict import CIMultiDict, istr

from bascule.config import Secrets
from bascule.stages import Side
from refapi.lab import write_config
from shadow.compare import Answer
from shadow.diff import Diff, Difference
from shadow.dispatch import Job
from shadow.wire import (
    MAX_FRAME,
    Hello,
    JobFrame,
    Report,
    frame,
    job_frame,
    job_of,
    read_to_proxy,
    read_to_worker,
)


def reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


JOB = Job(
    dataset="dcir",
    route="/v1/datasets/{dataset}/records/{id}",
    method="GET",
    target="/v1/datasets/dcir/records/5?fields=amount",
    headers=[("Authorization", "Bearer r"), ("Accept", "application/json")],
    body=b"",
    serving=Side.SOURCE,
    shadowed=Side.TARGET,
    answer=Answer(
        200,
        CIMultiDict(
            [(istr("Content-Type"), "application/json"), ("Set-Cookie", "a"), ("Set-Cookie", "b")]
        ),
        b'{"record": {"id": 5}}',
    ),
    t0=1_700_000_000.25,
    records=("t5", "*"),
    traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
)


async def test_a_job_arrives_as_it_was_sent_with_its_number() -> None:
    got = await read_to_worker(reader_of(frame(job_frame(JOB, 7))))
    assert isinstance(got, JobFrame)
    job = job_of(got)
    assert job.seq == 7
    for name in ("dataset", "route", "method", "target", "body", "serving", "shadowed", "t0"):
        assert getattr(job, name) == getattr(JOB, name), name
    assert list(job.headers) == list(JOB.headers)
    assert job.records == JOB.records and job.traceparent == JOB.traceparent
    assert job.answer.status == 200 and job.answer.body == JOB.answer.body
    # Repeated headers keep every value, in order; names are found in any case.
    assert isinstance(job.answer.headers, CIMultiDict)
    assert job.answer.headers.getall("set-cookie") == ["a", "b"]
    assert job.answer.headers["content-type"] == "application/json"


async def test_the_hello_carries_the_config_and_secrets(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "b.toml",
        source_url="http://127.0.0.1:1",
        target_url="http://127.0.0.1:2",
        postgres_url="postgresql://127.0.0.1/x",
        redis_url="redis://127.0.0.1:6379/0",
        redis_prefix="p:",
        shadow_worker="process",
    )
    secrets = Secrets(hmac_key=b"h" * 32, journal_key=b"j" * 32)
    hello = Hello(config, secrets, "postgresql://127.0.0.1/x", "redis://127.0.0.1/0", "host:1")
    got = await read_to_worker(reader_of(frame(hello)))
    assert got == hello


async def test_a_report_carries_outcomes_and_pointers_only() -> None:
    diff = Diff((Difference("body", "/records/3/amount", "changed"),), truncated=2)
    report = Report(
        [4, 5],
        [("dcir", "/r", "matched", 7, 3), ("dcir", "/r", "compared", 7, 4)],
        [("dcir", "/r", "shadow_timeout", 7, 1)],
        [
            ("dcir", "/r", diff, "0af7651916cd43dd8448eb211c80319c", 1796000000.25, 7),
            ("dcir", "/r", diff, None, None, 6),
        ],
    )
    got = await read_to_proxy(reader_of(frame(report)))
    assert got == report
    assert isinstance(got, Report) and got.mismatches[0][2] == diff
    assert got.mismatches[0][4] == 1796000000.25  # when it was found, to the microsecond
    bad = msgspec.msgpack.encode(
        {"type": "report", "seqs": [], "counts": [["d", "r", "won", 1, 1]]}
    )
    with pytest.raises(msgspec.ValidationError):  # an outcome the ledger does not know
        await read_to_proxy(reader_of(struct.pack(">I", len(bad)) + bad))


async def test_frames_follow_one_another_and_a_clean_end_is_none() -> None:
    reader = reader_of(frame(Report([1, 2])) + frame(Report([3])))
    assert await read_to_proxy(reader) == Report([1, 2])
    assert await read_to_proxy(reader) == Report([3])
    assert await read_to_proxy(reader) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (frame(Report([1]))[:-1], "inside a frame"),
        (frame(Report([1]))[:2], "inside a frame"),
        (struct.pack(">I", MAX_FRAME + 1), "over the limit"),
    ],
)
async def test_a_broken_or_oversized_frame_is_an_error(data: bytes, message: str) -> None:
    with pytest.raises(ConnectionError, match=message):
        await read_to_proxy(reader_of(data))


async def test_a_frame_of_the_wrong_shape_is_refused() -> None:
    body = msgspec.msgpack.encode({"type": "report", "seqs": "not a list"})
    with pytest.raises(msgspec.ValidationError):
        await read_to_proxy(reader_of(struct.pack(">I", len(body)) + body))
    # A worker's message is not a proxy's: each end decodes only what it may be sent.
    with pytest.raises(msgspec.ValidationError):
        await read_to_worker(reader_of(frame(Report([1]))))
