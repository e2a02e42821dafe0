"""bascule's metrics, in one place: their names, what they count, and how they are recorded.

Instruments are OpenTelemetry's (the metrics SDK), scraped in Prometheus text format on the
admin port (``GET /metrics``, the viewer's token) and pushed by OTLP when ``[telemetry]
exporter`` is ``otlp-grpc`` or ``otlp-http``. :data:`PROMETHEUS` gives each one's name as a
Prometheus scrape shows it (the on-call page and the Grafana dashboard read those).

Labels are bounded: route templates and datasets come from the configuration (a dataset a
request names that is not configured is ``other``); mismatch pointers are normalised (array
indexes and tokenised member names collapsed to ``*``) and capped per dataset
(:data:`POINTER_CAP`, past it ``(other)``). No label ever holds a value, a path or a token.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

if TYPE_CHECKING:
    from bascule.config import TelemetrySettings

# -- Names (OpenTelemetry instrument names) --------------------------------------------------

SERVER_DURATION = "http.server.request.duration"
"""Histogram, seconds: researchers' requests, from their head in to their answer out (OTel HTTP
semantic conventions). Labels ``http.request.method``, ``http.route`` (the template),
``http.response.status_code``, ``bascule.dataset``."""
CLIENT_DURATION = "http.client.request.duration"
"""Histogram, seconds: calls to a backend, until their answer is read. Labels
``http.request.method``, ``http.response.status_code`` (or ``error.type``), ``bascule.origin``
(source|target), ``bascule.role`` (serve|write|shadow|replay)."""
COMPARISONS = "bascule.shadow.comparisons"
"""Counter: shadow reads by ``bascule.outcome`` (matched, mismatched, errored, skipped_*,
dropped), ``bascule.dataset`` and ``http.route``."""
MISMATCHES = "bascule.shadow.mismatches"
"""Counter: differences found by mismatched shadow reads, by ``bascule.dataset``,
``bascule.part`` (status, header, body), ``bascule.pointer`` (normalised, capped) and
``bascule.kind`` (changed, missing, extra, type)."""
SHADOW_DROPPED = "bascule.shadow.dropped"
"""Counter: reads not shadow-read for want of room (queue or memory), by ``bascule.dataset``."""
JOURNAL_BACKLOG = "bascule.journal.backlog"
"""Gauge: journaled writes not yet replayed (intent + pending), by ``bascule.dataset``."""
JOURNAL_OLDEST = "bascule.journal.oldest_age"
"""Gauge, seconds: age of the oldest pending write (0: none), by ``bascule.dataset``."""
JOURNAL_IN_DOUBT = "bascule.journal.in_doubt"
"""Gauge: writes whose outcome is not known, by ``bascule.dataset``."""
JOURNAL_DEAD = "bascule.journal.dead"
"""Gauge: writes whose replay gave up (dead letters), by ``bascule.dataset``."""
STAGE = "bascule.stage"
"""Gauge: 1 for each dataset's current stage (``bascule.dataset``, ``bascule.stage``)."""
GATE_OPEN = "bascule.gate.open"
"""Gauge: 1 when the dataset's gate to its next stage holds, 0 when a condition fails
(datasets in ``shadow`` or past it), by ``bascule.dataset``."""
GATE_CONDITION = "bascule.gate.condition"
"""Gauge: per gate condition (``bascule.dataset``, ``bascule.condition``), 1 when it holds, 0
when it fails: ``bascule_gate_condition == 0`` names what keeps a gate closed."""

PROMETHEUS: dict[str, str] = {
    SERVER_DURATION: "http_server_request_duration_seconds",
    CLIENT_DURATION: "http_client_request_duration_seconds",
    COMPARISONS: "bascule_shadow_comparisons_total",
    MISMATCHES: "bascule_shadow_mismatches_total",
    SHADOW_DROPPED: "bascule_shadow_dropped_total",
    JOURNAL_BACKLOG: "bascule_journal_backlog",
    JOURNAL_OLDEST: "bascule_journal_oldest_age_seconds",
    JOURNAL_IN_DOUBT: "bascule_journal_in_doubt",
    JOURNAL_DEAD: "bascule_journal_dead",
    STAGE: "bascule_stage",
    GATE_OPEN: "bascule_gate_open",
    GATE_CONDITION: "bascule_gate_condition",
}
"""Each instrument's name in a Prometheus scrape (histograms: ``_bucket``, ``_sum``,
``_count`` series of it)."""

POINTER_CAP = 200
"""Distinct normalised pointers counted per dataset; the rest as ``(other)``."""
OVERFLOW = "(other)"
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_PLAIN = re.compile(r"[a-z_][a-z_]{0,47}[0-9]{0,2}")


def normalise(pointer: str) -> str:
    """A pointer with every segment that could name a record (an array index, a tokenised
    member name) made ``*``: ``/records/12/amount`` -> ``/records/*/amount``."""
    if not pointer:
        return pointer
    return "/".join(
        s if i == 0 or _PLAIN.fullmatch(s) else "*" for i, s in enumerate(pointer.split("/"))
    )


@dataclass
class Figures:
    """What the gauges report, refreshed by the replica's poller (``bascule/app/replica.py``)
    from the state database; read at collection."""

    journal: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)
    gates: dict[str, dict[str, bool]] = field(default_factory=dict)
    """Per dataset whose gate applies: each condition's name and whether it holds."""
    at: float = 0.0


figures = Figures()


class Instruments:
    """The instruments, made once the meter provider is installed."""

    def __init__(self, meter: otel_metrics.Meter) -> None:
        self.server = Durations(
            SERVER_DURATION,
            "Researchers' requests through bascule",
            ("http.request.method", "http.route", "http.response.status_code", "bascule.dataset"),
        )
        self.client = Durations(
            CLIENT_DURATION,
            "Calls to a backend",
            (
                "http.request.method",
                "http.response.status_code",
                "error.type",
                "bascule.origin",
                "bascule.role",
            ),
        )
        self.comparisons = meter.create_counter(
            COMPARISONS, description="Shadow reads by outcome and route template"
        )
        self.mismatches = meter.create_counter(
            MISMATCHES, description="Differences of mismatched shadow reads by pointer"
        )
        self.dropped = meter.create_counter(
            SHADOW_DROPPED, description="Reads not shadow-read for want of room"
        )
        self._pointers: dict[str, set[str]] = {}
        self.datasets: frozenset[str] = frozenset()
        gauges = (
            (JOURNAL_BACKLOG, "", "Journaled writes not yet replayed", "backlog"),
            (JOURNAL_OLDEST, "s", "Age of the oldest pending write", "oldest_pending_seconds"),
            (JOURNAL_IN_DOUBT, "", "Writes whose outcome is not known", "in_doubt"),
            (JOURNAL_DEAD, "", "Writes whose replay gave up", "dead"),
        )
        for name, unit, description, key in gauges:
            meter.create_observable_gauge(
                name, callbacks=[_journal(key)], unit=unit, description=description
            )
        meter.create_observable_gauge(
            STAGE, callbacks=[_stages], description="1 for each dataset's current stage"
        )
        meter.create_observable_gauge(
            GATE_OPEN, callbacks=[_gates], description="1 when the dataset's gate holds"
        )
        meter.create_observable_gauge(
            GATE_CONDITION, callbacks=[_conditions], description="1 when a gate condition holds"
        )

    def dataset(self, name: str | None) -> str:
        if name is None:
            return "none"
        return name if not self.datasets or name in self.datasets else "other"

    def mismatch(self, dataset: str, part: str, pointer: str, kind: str) -> None:
        seen = self._pointers.setdefault(dataset, set())
        label = normalise(pointer)
        if label not in seen:
            if len(seen) >= POINTER_CAP:
                label = OVERFLOW
            else:
                seen.add(label)
        self.mismatches.add(
            1,
            {
                "bascule.dataset": self.dataset(dataset),
                "bascule.part": part,
                "bascule.pointer": label,
                "bascule.kind": kind,
            },
        )


class Durations:
    """A histogram of durations (seconds) on the researcher's path, aggregated here rather than
    by the SDK: the SDK's ``Histogram.record`` cost 7.6 µs a call per reader on this machine
    (attributes hashed, a measurement made, each reader's storage updated), two per request,
    against a proxy budget of ~20 µs for all telemetry. ``record`` is a dictionary lookup, a
    bisection and four additions (event-loop thread only). The readers of this module
    (:func:`install`) add these as ordinary OTel histograms (cumulative, explicit buckets) to
    what they export, so ``/metrics`` and OTLP see the semantic-convention histograms."""

    def __init__(self, name: str, description: str, labels: tuple[str, ...]) -> None:
        self.name, self.description, self.labels = name, description, labels
        self.bounds = BUCKETS
        self._series: dict[tuple[Any, ...], list[Any]] = {}
        self._start = time.time_ns()

    def record(self, seconds: float, key: tuple[Any, ...]) -> None:
        """One duration; ``key``: the values of :attr:`labels`, in order (None: absent)."""
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = [[0] * (len(self.bounds) + 1), 0.0, 0, seconds, seconds]
        series[0][bisect_left(self.bounds, seconds)] += 1
        series[1] += seconds
        series[2] += 1
        if seconds < series[3]:
            series[3] = seconds
        elif seconds > series[4]:
            series[4] = seconds

    def metric(self) -> Metric:
        now = time.time_ns()
        points = [
            HistogramDataPoint(
                attributes={k: v for k, v in zip(self.labels, key, strict=True) if v is not None},
                start_time_unix_nano=self._start,
                time_unix_nano=now,
                count=count,
                sum=total,
                bucket_counts=list(counts),
                explicit_bounds=self.bounds,
                min=low,
                max=high,
            )
            for key, (counts, total, count, low, high) in list(self._series.items())
        ]
        return Metric(
            name=self.name,
            description=self.description,
            unit="s",
            data=Histogram(
                data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE
            ),
        )


def _with_durations(data: MetricsData | None) -> MetricsData | None:
    """What a reader collected, with the :class:`Durations` histograms added."""
    m = current
    if m is None or _provider is None:
        return data
    extra = [m.server.metric(), m.client.metric()]
    if data is None or not data.resource_metrics:
        resource = _provider._sdk_config.resource
        scope = ScopeMetrics(InstrumentationScope("bascule"), extra, "")
        return MetricsData([ResourceMetrics(resource, [scope], "")])
    first = data.resource_metrics[0]
    scope = ScopeMetrics(InstrumentationScope("bascule"), extra, "")
    resource_metrics = [
        ResourceMetrics(first.resource, [*first.scope_metrics, scope], first.schema_url),
        *data.resource_metrics[1:],
    ]
    return MetricsData(resource_metrics)


def _journal(key: str) -> Any:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        for dataset, row in figures.journal.items():
            value = row.get(key)
            yield Observation(float(value or 0), {"bascule.dataset": dataset})

    return observe


def _stages(options: CallbackOptions) -> Iterable[Observation]:
    for dataset, stage in figures.stages.items():
        yield Observation(1, {"bascule.dataset": dataset, "bascule.stage": stage})


def _gates(options: CallbackOptions) -> Iterable[Observation]:
    for dataset, conditions in figures.gates.items():
        yield Observation(1 if all(conditions.values()) else 0, {"bascule.dataset": dataset})


def _conditions(options: CallbackOptions) -> Iterable[Observation]:
    for dataset, conditions in figures.gates.items():
        for name, ok in conditions.items():
            labels = {"bascule.dataset": dataset, "bascule.condition": name}
            yield Observation(1 if ok else 0, labels)


current: Instruments | None = None
"""None until :func:`install`: recording then costs one test."""
_provider: MeterProvider | None = None


def install(resource: Resource, settings: TelemetrySettings | None = None) -> None:
    """The process's meter provider, once: the Prometheus reader (``GET /metrics``), and an
    OTLP push every ``metrics_interval`` seconds when ``settings`` name an OTLP exporter (the
    SDK fixes a provider's readers when it is made: the first call decides)."""
    global current, _provider
    if _provider is not None:
        return
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    class Scraped(PrometheusMetricReader):
        def _receive_metrics(
            self, metrics_data: Any, timeout_millis: float = 10_000, **kw: Any
        ) -> None:
            super()._receive_metrics(_with_durations(metrics_data), timeout_millis, **kw)  # type: ignore[arg-type]

    readers: list[MetricReader] = [Scraped()]
    if settings is not None and settings.exporter.startswith("otlp"):
        readers.append(_pushing(settings))
    _provider = MeterProvider(
        metric_readers=readers, resource=resource, exemplar_filter=AlwaysOffExemplarFilter()
    )
    otel_metrics.set_meter_provider(_provider)
    current = Instruments(_provider.get_meter("bascule"))


def _pushing(settings: TelemetrySettings) -> MetricReader:
    from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader

    exporter: MetricExporter
    if settings.exporter == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetrics,
        )

        exporter = GrpcMetrics(endpoint=settings.endpoint) if settings.endpoint else GrpcMetrics()
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetrics,
        )

        exporter = (
            HttpMetrics(endpoint=settings.endpoint.rstrip("/") + "/v1/metrics")
            if settings.endpoint
            else HttpMetrics()
        )

    class Pushed(PeriodicExportingMetricReader):
        def _receive_metrics(
            self, metrics_data: Any, timeout_millis: float = 10_000, **kw: Any
        ) -> None:
            super()._receive_metrics(_with_durations(metrics_data), timeout_millis, **kw)  # type: ignore[arg-type]

    interval = int(settings.metrics_interval * 1000)
    return Pushed(exporter, export_interval_millis=interval)


def configure(datasets: Iterable[str]) -> None:
    """The configured datasets: any other a request names is labelled ``other``. Their
    drop counters start at 0, so a scrape shows them before the first drop."""
    if current is not None:
        current.datasets = frozenset(datasets)
        for name in sorted(current.datasets):
            current.dropped.add(0, {"bascule.dataset": name})


def scrape() -> bytes:
    """Every metric in Prometheus text format (the admin port's ``GET /metrics``)."""
    from prometheus_client import REGISTRY, generate_latest

    return generate_latest(REGISTRY)


def now() -> float:
    return time.perf_counter()
