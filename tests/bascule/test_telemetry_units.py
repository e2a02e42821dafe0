"""The telemetry kernel without a world: the head and tail decisions, the bounded mismatch
series, and the log lines' fields."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from bascule import logs, metrics, telemetry
from bascule.config import TelemetrySettings
from tests.tracing import kept_spans


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Kept spans, in memory; no request sampled from its start unless a test says so."""
    with kept_spans(0.0) as exporter:
        yield exporter


def test_an_unsampled_request_is_kept_when_it_fails(spans: InMemorySpanExporter) -> None:
    ok = telemetry.begin("GET", None)
    telemetry.route(ok, "/v1/datasets/{dataset}/records/{id}", "dcir", "shadow")
    telemetry.end(ok, 200)
    assert spans.get_finished_spans() == ()  # neither sampled nor failed: held, not exported

    failed = telemetry.begin("GET", None)
    telemetry.route(failed, "/v1/datasets/{dataset}/records/{id}", "dcir", "shadow")
    telemetry.end(failed, 502)
    (span,) = spans.get_finished_spans()
    assert span.name == "GET /v1/datasets/{dataset}/records/{id}"
    assert span.status.status_code is StatusCode.ERROR
    assert span.context is not None and span.context.trace_id == failed.trace_id
    assert span.attributes is not None and span.attributes["http.response.status_code"] == 502

    # A divergence found later names the first one: it is exported then, as it was.
    telemetry.keep_trace(ok.trace_hex)
    names = [s.context.trace_id for s in spans.get_finished_spans() if s.context is not None]
    assert names == [failed.trace_id, ok.trace_id]


def test_a_researchers_sampled_flag_and_trace_id_are_followed(
    spans: InMemorySpanExporter,
) -> None:
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    req = telemetry.begin("GET", incoming)
    assert req.span is not None  # flagged sampled by the researcher
    telemetry.route(req, "/x/{dataset}", "dcir")
    sent = telemetry.traceparent_now()
    telemetry.end(req, 200)
    assert sent is not None and sent.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    (span,) = spans.get_finished_spans()
    assert span.parent is not None and span.parent.span_id == 0xB7AD6B7169203331

    unsampled = telemetry.begin("GET", incoming[:-2] + "00")
    assert unsampled.span is None  # ratio 0
    assert unsampled.traceparent.startswith("00-0af7651916cd43dd8448eb211c80319c-")
    telemetry.end(unsampled, 200)
    for bad in ("", "garbage", "00-" + "0" * 32 + "-b7ad6b7169203331-01", incoming.upper()):
        assert telemetry.parse_traceparent(bad) is None, bad


def test_mismatch_series_stay_bounded_under_10000_record_ids() -> None:
    """10,000 records differing at their own array index, under a tokenised key (a map keyed by
    patient id), and under 10,000 plain names (a map keyed by words): a bounded set of series,
    every difference still counted."""
    reader = InMemoryMetricReader()
    instruments = metrics.Instruments(MeterProvider([reader]).get_meter("test"))
    instruments.datasets = frozenset({"dcir"})
    for i in range(10_000):
        instruments.mismatch("dcir", "body", f"/records/{i}/amount", "changed")
        instruments.mismatch("dcir", "body", f"/by_patient/P{i:08x}/amount", "changed")
        word = "".join(chr(97 + int(d)) for d in str(i))
        instruments.mismatch("dcir", "body", f"/by_code/{word}", "changed")
        instruments.mismatch(f"unknown{i}", "body", "/x", "missing")
    data = reader.get_metrics_data()
    assert data is not None
    points = [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == metrics.MISMATCHES
        for p in m.data.data_points
    ]
    pointers = {p.attributes["bascule.pointer"] for p in points if p.attributes}
    assert "/records/*/amount" in pointers and "/by_patient/*/amount" in pointers
    assert metrics.OVERFLOW in pointers
    assert len(points) <= metrics.POINTER_CAP + 2  # + the overflow, + the unknown datasets'
    assert sum(p.value for p in points if isinstance(p, NumberDataPoint)) == 40_000


def test_log_lines_carry_the_requests_trace_and_route_not_its_path() -> None:
    req = telemetry.begin("GET", None)
    telemetry.route(req, "/v1/datasets/{dataset}/records/{id}", "dcir", "shadow")
    record = logging.LogRecord(
        "bascule.proxy", logging.WARNING, __file__, 1, "backend %s: %s", ("azure", "Timeout"), None
    )
    line = json.loads(logs.JsonLines().format(record))
    readable = logs.Readable().format(record)
    telemetry.end(req, 200)
    assert "trace_id" not in json.loads(logs.JsonLines().format(record))  # served: no longer
    assert line["trace_id"] == req.trace_hex
    assert (line["dataset"], line["stage"], line["route"]) == (
        "dcir",
        "shadow",
        "/v1/datasets/{dataset}/records/{id}",
    )
    assert line["level"] == "WARNING" and line["message"] == "backend azure: Timeout"
    assert "dataset=dcir" in readable and "trace=" in readable


def test_the_dashboard_shows_every_documented_metric() -> None:
    """``deploy/grafana/bascule.json`` queries every metric ``bascule/metrics.py`` documents,
    by its Prometheus name."""
    root = Path(__file__).resolve().parents[2]
    dashboard = json.loads((root / "deploy/grafana/bascule.json").read_text())
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for name in metrics.PROMETHEUS.values():
        assert name in queries, name


@pytest.mark.parametrize(
    ("exporter", "kind"),
    [
        ("console", "ConsoleSpanExporter"),
        ("otlp-grpc", "opentelemetry.exporter.otlp.proto.grpc"),
        ("otlp-http", "opentelemetry.exporter.otlp.proto.http"),
    ],
)
def test_each_configured_exporter_is_the_one_named(exporter: str, kind: str) -> None:
    settings = TelemetrySettings(exporter=exporter, endpoint="http://127.0.0.1:9")  # type: ignore[arg-type]
    made = telemetry._span_exporter(settings)
    assert kind in f"{type(made).__module__}.{type(made).__name__}"
    made.shutdown()
