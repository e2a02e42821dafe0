"""The frames between a proxy and its shadow worker process, over one socket pair.

A frame is a 4-byte big-endian length and a MessagePack body (msgspec: typed on both ends, so
a frame of the wrong shape is an error, never a guess). The socket is private to the two
processes: the first frame carries what the worker needs to open its stores, secrets
included, and nothing crosses a file, an argument list or an environment the worker did not
already inherit. No frame is ever logged.
"""

from __future__ import annotations

import asyncio
import struct

import msgspec
from multidict import CIMultiDict

from bascule.config import Config, Secrets
from bascule.stages import Side
from shadow.compare import Answer
from shadow.diff import Diff
from shadow.dispatch import Job
from shadow.ledger import Outcome

_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 30
"""A frame past this is refused: no answer compared is larger (``max_body_bytes``)."""


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """Proxy to worker, first: what to open, and as which replica."""

    config: Config
    secrets: Secrets
    postgres_url: str
    redis_url: str
    replica: str


class JobFrame(msgspec.Struct, tag="job", frozen=True):
    """Proxy to worker: one shadow read (:class:`shadow.dispatch.Job`)."""

    seq: int
    dataset: str
    route: str
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    serving: str
    shadowed: str
    status: int
    answer_headers: list[tuple[str, str]]
    answer_body: bytes
    t0: float
    records: tuple[str, ...] | None
    traceparent: str | None
    version: int = 0


class Join(msgspec.Struct, tag="join", frozen=True):
    """Proxy to worker: answer :class:`Joined` once every job sent before is done and its
    counts are flushed."""

    id: int


class Reload(msgspec.Struct, tag="reload", frozen=True):
    """Proxy to worker: the configuration reloaded (SIGHUP); the jobs sent after it are
    compared on its rules."""

    config: Config


class Ready(msgspec.Struct, tag="ready", frozen=True):
    """Worker to proxy: its stores are open and its dispatcher is started."""

    pid: int


class Report(msgspec.Struct, tag="report", frozen=True):
    """Worker to proxy: these jobs are done, and the outcomes counted since the last report
    (theirs among them: a job's outcome and its number always travel in the same report).
    The proxy writes them to the ledger; the worker writes no count. Also sent, empty, as a
    sign of life."""

    seqs: list[int]
    counts: list[tuple[str, str, Outcome, int, int]] = []
    """(dataset, route, outcome, stage version, n)."""
    errors: list[tuple[str, str, str, int, int]] = []
    """Errored comparisons: (dataset, route, reason, stage version, n)."""
    mismatches: list[tuple[str, str, Diff, str | None, float | None, int]] = []
    """(dataset, route, diff, trace id, when found, stage version): pointers and kinds, never
    a value."""


class Joined(msgspec.Struct, tag="joined", frozen=True):
    id: int


ToWorker = Hello | JobFrame | Join | Reload
ToProxy = Ready | Report | Joined

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_to_proxy = msgspec.msgpack.Decoder(ToProxy)


def frame(message: ToWorker | ToProxy) -> bytes:
    body = _encoder.encode(message)
    return _LENGTH.pack(len(body)) + body


async def _read(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's body; None at a clean end of the stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ConnectionError("the shadow link broke inside a frame") from None
        return None
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise ConnectionError(f"a shadow link frame of {length} bytes is over the limit")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ConnectionError("the shadow link broke inside a frame") from None


async def read_to_worker(reader: asyncio.StreamReader) -> ToWorker | None:
    body = await _read(reader)
    return None if body is None else _to_worker.decode(body)


async def read_to_proxy(reader: asyncio.StreamReader) -> ToProxy | None:
    body = await _read(reader)
    return None if body is None else _to_proxy.decode(body)


def job_frame(job: Job, seq: int) -> JobFrame:
    return JobFrame(
        seq=seq,
        dataset=job.dataset,
        route=job.route,
        method=job.method,
        target=job.target,
        headers=[(str(k), str(v)) for k, v in job.headers],
        body=job.body,
        serving=job.serving.value,
        shadowed=job.shadowed.value,
        status=job.answer.status,
        answer_headers=[(str(k), str(v)) for k, v in job.answer.headers.items()],
        answer_body=job.answer.body,
        t0=job.t0,
        records=job.records,
        traceparent=job.traceparent,
        version=job.version,
    )


def job_of(f: JobFrame) -> Job:
    return Job(
        dataset=f.dataset,
        route=f.route,
        method=f.method,
        target=f.target,
        headers=f.headers,
        body=f.body,
        serving=Side(f.serving),
        shadowed=Side(f.shadowed),
        answer=Answer(f.status, CIMultiDict(f.answer_headers), f.answer_body),
        t0=f.t0,
        records=f.records,
        traceparent=f.traceparent,
        seq=f.seq,
        version=f.version,
    )
