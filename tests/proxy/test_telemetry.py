"""On-call's view through a real replica (in process, the shared world): the span tree of a
shadowed read, a divergence event with pointers and no value, a replay linked to its write,
the trace context reaching both backends, and the Prometheus endpoint
(``docs/observability.md``)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from bascule import logs, metrics, telemetry
from bascule.stages import Stage
from refapi.lab import AUTH, VIEWER_TOKEN
from tests.conftest import Ground
from tests.harness import Forward
from tests.tracing import kept_spans
from tests.world import PLANTED, Hooks, build_world, get, shadow_world

pytestmark = pytest.mark.timeout(120)

ONE = "/v1/datasets/{dataset}/records/{id}"
RECORDS = "/v1/datasets/{dataset}/records"
INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING = f"00-{INCOMING_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans kept, in memory; every request sampled from its start unless a test says not."""
    with kept_spans(1.0) as exporter:
        yield exporter


def of_trace(spans: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [
        s
        for s in spans.get_finished_spans()
        if s.context is not None and f"{s.context.trace_id:032x}" == trace_id
    ]


def _facts_only(kept: list[Any]) -> bool:
    """A held trace that is an unsampled request's facts, not recorded SDK spans."""
    return all(not isinstance(k, ReadableSpan) for k in kept)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def kept(spans: InMemorySpanExporter, trace_id: str, n: int) -> list[ReadableSpan]:
    """The trace's spans once ``n`` have been kept (the tail decision may come after)."""
    for _ in range(100):
        found = of_trace(spans, trace_id)
        if len(found) >= n:
            return found
        await asyncio.sleep(0.05)
    return of_trace(spans, trace_id)


async def test_a_read_in_shadow_gives_the_documented_span_tree(
    ground: Ground, spans: InMemorySpanExporter
) -> None:
    async with shadow_world(ground) as world:
        async with aiohttp.ClientSession(headers={**AUTH, "traceparent": INCOMING}) as session:
            assert await get(session, f"{world.proxy}/v1/datasets/dcir/records/3?x=1") == 200
        assert (await world.settled())["matched"] == 1
        found = await kept(spans, INCOMING_TRACE, 5)
        sources = world.source.received, world.target.received

    by_name = {s.name: s for s in found}
    server = by_name[f"GET {ONE}"]
    assert server.kind is SpanKind.SERVER
    assert server.parent is not None and server.parent.span_id == 0x00F067AA0BA902B7
    assert attrs(server) == {
        "http.request.method": "GET",
        "http.route": ONE,
        "bascule.dataset": "dcir",
        "bascule.stage": "shadow",
        "http.response.status_code": 200,
    }
    assert server.context is not None
    clients = [s for s in found if s.kind is SpanKind.CLIENT]
    serve = next(s for s in clients if attrs(s)["bascule.role"] == "serve")
    assert attrs(serve)["bascule.origin"] == "source"
    assert serve.parent is not None and serve.parent.span_id == server.context.span_id

    shadow = by_name[telemetry.SHADOW_SPAN]
    assert shadow.parent is not None and shadow.parent.span_id == server.context.span_id
    assert attrs(shadow)["bascule.outcome"] == "matched"
    assert shadow.context is not None
    shadowed = next(s for s in clients if attrs(s)["bascule.role"] == "shadow")
    assert attrs(shadowed)["bascule.origin"] == "target"
    assert shadowed.parent is not None and shadowed.parent.span_id == shadow.context.span_id
    compare = by_name[telemetry.COMPARE_SPAN]
    assert compare.parent is not None and compare.parent.span_id == shadow.context.span_id
    assert attrs(compare)["bascule.equal"] is True and not compare.events

    # No span carries the concrete path or its query string.
    assert not any("records/3" in str(s.to_json()) or "x=1" in s.to_json() for s in found)
    # Each backend got bascule's span of its call, in the researcher's trace.
    for received, span in zip(sources, (serve, shadowed), strict=True):
        assert span.context is not None
        sent = f"00-{INCOMING_TRACE}-{span.context.span_id:016x}-01"
        assert sent in [r.traceparent for r in received]


async def test_a_mismatch_gives_a_divergence_event_with_pointers_and_no_value(
    ground: Ground, spans: InMemorySpanExporter
) -> None:
    """With no request sampled from its start, the divergent one is kept all the same (the
    tail decision), its server span included; the value planted appears nowhere."""
    telemetry.set_ratio(0.0)
    async with shadow_world(ground) as world:
        await world.sql(world.target_db, "UPDATE dcir SET patient_id = $1 WHERE id = 8", PLANTED)
        async with aiohttp.ClientSession(headers=AUTH) as session:
            assert await get(session, f"{world.proxy}/v1/datasets/dcir/records/8") == 200
            assert await get(session, f"{world.proxy}/v1/datasets/dcir/records/9") == 200
        counts = await world.settled()
        assert counts["mismatched"] == 1 and counts["matched"] == 1, counts
        (mismatch,) = await world.mismatches()
        found = await kept(spans, mismatch["trace_ids"][0], 4)
    assert len({s.context.trace_id for s in spans.get_finished_spans() if s.context}) == 1
    by_name = {s.name: s for s in found}
    assert f"GET {ONE}" in by_name  # the request's span, built after the fact
    compare = by_name[telemetry.COMPARE_SPAN]
    (event,) = compare.events
    assert event.name == telemetry.DIVERGENCE
    assert dict(event.attributes or {}) == {
        "bascule.pointers": ("body:/record/patient_id",),
        "bascule.kinds": ("changed",),
        "bascule.count": 1,
    }
    assert attrs(by_name[telemetry.SHADOW_SPAN])["bascule.outcome"] == "mismatched"
    for span in spans.get_finished_spans():
        assert PLANTED not in span.to_json()


async def test_a_write_in_dualwrite_gives_a_replay_span_linked_to_it(
    ground: Ground, spans: InMemorySpanExporter
) -> None:
    async with build_world(ground, rows=5, stages=(Stage.DUALWRITE,)) as world:
        async with aiohttp.ClientSession(headers={**AUTH, "traceparent": INCOMING}) as session:
            async with session.patch(
                f"{world.proxy}/v1/datasets/dcir/records/2", json={"amount": 12}
            ) as resp:
                assert resp.status == 200
        await world.drained()
        stored = await world.sql(world.state_db, "SELECT traceparent FROM bascule_journal")
        for _ in range(100):
            replays = [s for s in spans.get_finished_spans() if s.name == telemetry.REPLAY_SPAN]
            if replays:
                break
            await asyncio.sleep(0.05)
        received = world.target.received
    write = next(s for s in of_trace(spans, INCOMING_TRACE) if s.kind is SpanKind.SERVER)
    assert write.name == f"PATCH {ONE}" and write.context is not None
    assert [r["traceparent"] for r in stored] == [
        f"00-{INCOMING_TRACE}-{write.context.span_id:016x}-01"
    ]
    (replay,) = replays
    (link,) = replay.links
    assert (link.context.trace_id, link.context.span_id) == (
        write.context.trace_id,
        write.context.span_id,
    )
    assert attrs(replay)["bascule.dataset"] == "dcir"
    assert attrs(replay)["bascule.origin"] == "target"
    assert replay.context is not None
    assert replay.context.trace_id >> 64 != 0, "a 64-bit trace id"
    (call,) = [s for s in of_trace(spans, f"{replay.context.trace_id:032x}") if s is not replay]
    assert attrs(call)["bascule.role"] == "replay" and call.context is not None
    # The target got the replay's own trace context.
    sent = f"00-{replay.context.trace_id:032x}-{call.context.span_id:016x}-01"
    assert sent in [r.traceparent for r in received]


async def test_an_unsampled_replay_makes_no_span_unless_it_fails(ground: Ground) -> None:
    """At ratio 0 a replay is decided unsampled: it makes no SDK span (a replay per write is
    the proxy's CPU budget) yet sends the target a ``traceparent`` of its own, flagged
    unsampled; a replay that fails (the target stopped) is exported all the same, ERROR,
    linked to its write."""
    with kept_spans(0.0) as spans:
        async with build_world(ground, rows=5, stages=(Stage.DUALWRITE,)) as world:
            unsampled = INCOMING.removesuffix("-01") + "-00"
            async with aiohttp.ClientSession(headers={**AUTH, "traceparent": unsampled}) as s:
                async with s.patch(
                    f"{world.proxy}/v1/datasets/dcir/records/2", json={"amount": 12}
                ) as resp:
                    assert resp.status == 200
                await world.drained()
                replayed = [r for r in world.target.received if r.method != "GET"]
                assert [s.name for s in spans.get_finished_spans()] == []
                # Not even a recorded span held for the tail decision: none was made.
                tail = telemetry._state.tail
                assert tail is not None
                held = {t for t, kept in tail._held.items() if not _facts_only(kept)}
                await world.target.stop()
                async with s.patch(
                    f"{world.proxy}/v1/datasets/dcir/records/3", json={"amount": 13}
                ) as resp:
                    assert resp.status == 200
                for _ in range(100):
                    failed = [
                        s for s in spans.get_finished_spans() if s.name == telemetry.REPLAY_SPAN
                    ]
                    if failed:
                        break
                    await asyncio.sleep(0.05)
                await world.target.start()
                await world.drained()
    (sent,) = replayed
    parsed = telemetry.parse_traceparent(sent.traceparent)
    assert parsed is not None and sent.traceparent is not None
    assert parsed[0] not in held
    assert parsed[0] >> 64 != 0, "a 64-bit trace id"
    assert sent.traceparent.endswith("-00") and f"{parsed[0]:032x}" != INCOMING_TRACE
    replay = failed[0]
    assert replay.status.status_code.name == "ERROR"
    assert attrs(replay)["bascule.origin"] == "target"
    assert attrs(replay)["bascule.dataset"] == "dcir"
    (link,) = replay.links
    assert f"{link.context.trace_id:032x}" == INCOMING_TRACE
    assert replay.context is not None and replay.context.trace_flags.sampled


async def _refuse_replays(request: web.Request, forward: Forward) -> web.StreamResponse:
    """The target applies each write, then its gateway answers 503 (reads pass)."""
    answer = await forward()
    return answer if request.method == "GET" else web.json_response({}, status=503)


async def _failed_replay(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    """The first failed replay's trace, once its two spans (the replay, its call) are kept."""
    for _ in range(100):
        replays = [s for s in spans.get_finished_spans() if s.name == telemetry.REPLAY_SPAN]
        if replays and replays[0].context is not None:
            found = of_trace(spans, f"{replays[0].context.trace_id:032x}")
            if len(found) >= 2:
                return found
        await asyncio.sleep(0.05)
    raise AssertionError([s.name for s in spans.get_finished_spans()])


@pytest.mark.parametrize("fault", ["answers 503", "unreachable"])
async def test_an_unsampled_failed_replay_is_kept_with_its_call_and_why(
    ground: Ground, fault: str
) -> None:
    """Unsampled, a failed replay's trace holds what a sampled one's does (and what the SDK
    kept before replays stopped making SDK spans): the replay, ERROR, and its backend call as
    its child — the method it sent (``replay_as``: PUT for a PATCH), the side, role
    ``replay``, and why it failed (the status, or the error class). The target got the
    call's ids in its ``traceparent``; a replay's trace id is 128 random bits as a
    request's."""
    refused = fault == "answers 503"
    with kept_spans(0.0) as spans:
        hooks = Hooks(target=_refuse_replays) if refused else None
        async with build_world(ground, rows=5, stages=(Stage.DUALWRITE,), hooks=hooks) as world:
            if not refused:
                await world.target.stop()
            async with aiohttp.ClientSession(headers={**AUTH, "traceparent": INCOMING}) as s:
                async with s.patch(
                    f"{world.proxy}/v1/datasets/dcir/records/3", json={"amount": 13}
                ) as resp:
                    assert resp.status == 200
            found = await _failed_replay(spans)
            sent = [r.traceparent for r in world.target.received if r.method != "GET"]
            if not refused:
                await world.target.start()
    by_kind = {s.kind: s for s in found}
    replay, call = by_kind[SpanKind.INTERNAL], by_kind[SpanKind.CLIENT]
    assert replay.name == telemetry.REPLAY_SPAN and replay.parent is None
    assert replay.status.status_code.name == "ERROR" and replay.context is not None
    (link,) = replay.links
    assert f"{link.context.trace_id:032x}" == INCOMING_TRACE
    assert call.name == "PUT replay" and call.status.status_code.name == "ERROR"
    assert call.parent is not None and call.parent.span_id == replay.context.span_id
    expected: dict[str, Any] = {
        "http.request.method": "PUT",
        "bascule.origin": "target",
        "bascule.role": "replay",
    }
    if refused:
        expected["http.response.status_code"] = 503
        assert attrs(replay)["http.response.status_code"] == 503
    else:
        expected["error.type"] = "UpstreamUnreachable"
    assert attrs(call) == expected
    assert replay.context.trace_id >> 64 != 0, "a 64-bit trace id"
    assert call.context is not None
    if refused:
        trace_hex = f"{replay.context.trace_id:032x}"
        assert f"00-{trace_hex}-{call.context.span_id:016x}-00" in sent


async def test_an_unsampled_replay_cut_at_shutdown_is_kept_as_the_sdk_kept_it(
    ground: Ground,
) -> None:
    """The replayer cancelled (the replica stops) while a replay's call is in flight: the
    call did not complete, and the trace is kept as the SDK's spans were (its call ERROR,
    ``CancelledError``)."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held(request: web.Request, forward: Forward) -> web.StreamResponse:
        if request.method != "GET":
            arrived.set()
            await release.wait()  # the replay's call hangs until the replayer is stopped
        return await forward()

    with kept_spans(0.0) as spans:
        hooks = Hooks(target=held)
        async with build_world(ground, rows=5, stages=(Stage.DUALWRITE,), hooks=hooks) as world:
            async with aiohttp.ClientSession(headers=AUTH) as s:
                async with s.patch(
                    f"{world.proxy}/v1/datasets/dcir/records/3", json={"amount": 13}
                ) as resp:
                    assert resp.status == 200
            async with asyncio.timeout(10):
                await arrived.wait()
            task = world.replica.replayer_task
            assert task is not None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            release.set()
            found = await _failed_replay(spans)
    call = next(s for s in found if s.kind is SpanKind.CLIENT)
    assert attrs(call)["error.type"] == "CancelledError"
    assert call.status.status_code.name == "ERROR"


async def test_a_log_line_written_in_an_unsampled_replay_names_its_dataset_and_route(
    ground: Ground,
) -> None:
    """What a line is written for (``docs/observability.md``, Logs): the replayer's lines
    during a replay carry the replay's trace, dataset and route template, never the route
    ``unrouted`` of a request that matched none."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonLines())
    logger = logging.getLogger("bascule.replayer")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with kept_spans(0.0):
            async with build_world(ground, rows=5, stages=(Stage.DUALWRITE,)) as world:
                await world.target.stop()
                async with aiohttp.ClientSession(headers=AUTH) as s:
                    async with s.patch(
                        f"{world.proxy}/v1/datasets/dcir/records/3", json={"amount": 13}
                    ) as resp:
                        assert resp.status == 200
                for _ in range(100):
                    if "unreachable" in out.getvalue():
                        break
                    await asyncio.sleep(0.05)
                await world.target.start()
                await world.drained()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    (back,) = [line for line in lines if "answers again" in line["message"]]
    assert back.get("route") == ONE and back.get("dataset") == "dcir", back
    assert "trace_id" in back


@pytest.mark.parametrize("ratio", [0.0, 1.0])
async def test_a_researchers_traceparent_reaches_both_backends(
    ground: Ground, spans: InMemorySpanExporter, ratio: float
) -> None:
    """Sampled or not, the researcher's trace id goes to the serving side and to the shadow
    read of the other side; the researcher's own span id never does (bascule's span of the
    call, or of the request, is the backend's parent)."""
    telemetry.set_ratio(ratio)
    incoming = INCOMING[:-2] + "00"  # the researcher leaves the decision to bascule
    async with shadow_world(ground) as world:
        async with aiohttp.ClientSession(headers={**AUTH, "traceparent": incoming}) as session:
            assert await get(session, f"{world.proxy}/v1/datasets/dcir/records/4") == 200
        assert (await world.settled())["matched"] == 1
        source, target = list(world.source.received), list(world.target.received)
    (served,) = [r for r in source if r.route == ONE]
    (shadowed,) = [r for r in target if r.route == ONE]
    assert shadowed.shadow and not served.shadow
    for got in (served, shadowed):
        assert got.traceparent is not None
        parsed = telemetry.parse_traceparent(got.traceparent)
        assert parsed is not None
        assert f"{parsed[0]:032x}" == INCOMING_TRACE
        assert parsed[1] != 0x00F067AA0BA902B7
        assert parsed[2] is (ratio == 1.0)


def samples(text: str) -> dict[str, float]:
    """Prometheus text as {series: value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def total(found: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v
        for series, v in found.items()
        if re.match(rf"{name}(\{{|$)", series) and all(w in series for w in want)
    )


async def test_the_prometheus_endpoint_serves_every_metric_and_they_move(
    ground: Ground, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BASCULE_VIEWER_TOKEN", VIEWER_TOKEN)
    async with shadow_world(ground) as world:
        url = f"{world.admin_urls[0]}/metrics"
        viewer = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
        async with aiohttp.ClientSession() as admin:
            async with admin.get(url) as resp:
                assert resp.status == 401  # the viewer's token, as every read of the admin API
            async with admin.get(url, headers=viewer) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain")
                before = samples(await resp.text())

            await world.sql(world.target_db, "UPDATE dcir SET amount = amount + 1 WHERE id = 5")
            async with aiohttp.ClientSession(headers=AUTH) as session:
                base = f"{world.proxy}/v1/datasets/dcir/records"
                for rid in (1, 2, 3, 5):
                    assert await get(session, f"{base}/{rid}") == 200
                async with session.patch(f"{base}/2", json={"amount": 3}) as resp:
                    assert resp.status == 200
            await world.settled()
            await world.drained()
            async with admin.get(url, headers=viewer) as resp:
                text = await resp.text()
                after = samples(text)

    for name in metrics.PROMETHEUS.values():
        assert re.search(rf"^{name}(_bucket|_count|_sum)?\{{", text, re.M), name
    server = "http_server_request_duration_seconds_count"
    assert total(after, server, http_route=ONE) - total(before, server, http_route=ONE) == 5
    client = "http_client_request_duration_seconds_count"
    for role, origin, n in (
        ("serve", "source", 4),
        ("shadow", "target", 4),
        ("write", "source", 1),
    ):
        moved = total(after, client, bascule_role=role, bascule_origin=origin) - total(
            before, client, bascule_role=role, bascule_origin=origin
        )
        assert moved == n, (role, moved)
    comparisons = "bascule_shadow_comparisons_total"
    for outcome, n in (("matched", 3), ("mismatched", 1)):
        moved = total(after, comparisons, bascule_outcome=outcome, http_route=ONE) - total(
            before, comparisons, bascule_outcome=outcome, http_route=ONE
        )
        assert moved == n, outcome
    mismatched = "bascule_shadow_mismatches_total"
    assert (
        total(after, mismatched, bascule_pointer="/record/amount", bascule_dataset="dcir")
        - (total(before, mismatched, bascule_pointer="/record/amount", bascule_dataset="dcir"))
        == 1
    )
    assert total(after, "bascule_stage", bascule_dataset="dcir", bascule_stage="shadow") == 1
    assert total(after, "bascule_journal_backlog", bascule_dataset="dcir") == 0
    # dcir entered `shadow` a moment ago: its gate is closed, and its conditions say why.
    assert total(after, "bascule_gate_open", bascule_dataset="dcir") == 0
    condition = "bascule_gate_condition"
    assert total(after, condition, bascule_dataset="dcir", bascule_condition="window") == 0
    assert total(after, condition, bascule_dataset="dcir", bascule_condition="routes") == 1
    assert PLANTED not in text and "records/5" not in text


async def test_with_an_otlp_exporter_the_gauges_follow_the_stages_without_a_scrape(
    ground: Ground,
) -> None:
    """An OTLP push reads the gauges' figures: no scrape of /metrics may ever refresh them, so
    a replica configured to push refreshes them every ``metrics_interval`` itself."""
    otlp = '[telemetry]\nexporter = "otlp-http"\nendpoint = "http://127.0.0.1:9"\n'
    otlp += "metrics_interval = 0.2\n"
    async with build_world(ground, extra=otlp) as world:
        for stage in (Stage.DUALWRITE, Stage.SHADOW):
            await world.to_stage(stage)
            async with asyncio.timeout(10):
                while metrics.figures.stages.get("dcir") != stage.value:
                    await asyncio.sleep(0.05)
