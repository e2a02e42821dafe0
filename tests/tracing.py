"""Spans kept in memory, for the telemetry tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bascule import telemetry


@contextmanager
def kept_spans(ratio: float) -> Iterator[InMemorySpanExporter]:
    """Every span kept, in memory, while requests are sampled from their start at ``ratio``;
    the default ratio again afterwards."""
    telemetry.install()
    exporter = InMemorySpanExporter()
    telemetry.add_exporter(exporter, batch=False)
    telemetry.set_ratio(ratio)
    try:
        yield exporter
    finally:
        telemetry.remove_exporter(exporter)
        telemetry.set_ratio(0.01)
