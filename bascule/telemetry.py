"""OpenTelemetry set-up for a proxy process.

A process gets an SDK tracer provider, so the spans it makes (a shadow read, its comparison)
carry real W3C trace ids: the ids a mismatch record points on-call to. Spans and their
attributes name datasets, route templates, outcomes and JSON pointers — never a value.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider


def install(service: str = "bascule") -> None:
    """Install an SDK tracer provider unless the process already has one."""
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    trace.set_tracer_provider(TracerProvider(resource=Resource.create({"service.name": service})))
