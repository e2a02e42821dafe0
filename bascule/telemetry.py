"""OpenTelemetry for a bascule process: traces with a tail decision, W3C propagation, and the
hooks the proxy's hot path calls (``docs/observability.md`` lists every span and attribute).

**Head, then tail.** Researchers' requests are traced from the start on ``[telemetry]
sample_ratio`` of them (by the incoming trace id when a researcher sends one, so replicas
agree; a researcher's ``traceparent`` flagged sampled is always followed). An unsampled request
makes no SDK span at all — the proxy's CPU per request is the budget (``bench/proxy_overhead.py``)
— but it still gets a trace id and a span id, sent to both backends in ``traceparent`` (flag
``00``), and a few facts kept (method, route template, dataset, start, end, status). If it
fails (5xx, a backend unreachable) its server span is built from those facts and exported;
if a shadow read later finds it divergent (:func:`keep_trace`, told by the tally) the same.

Off the researcher's path (the shadow worker, the replayer), every span is recorded and the
decision is taken when the trace's local root ends (:class:`TailProcessor`): exported if
sampled, if a span failed (status ERROR), or if one carries a ``bascule.divergence`` event;
else held a short while (:data:`RECENT` traces) in case a divergence names it later.

Spans and their attributes name datasets, route templates, outcomes and JSON pointers, never a
value, a full URL, a query string or a token.
"""

from __future__ import annotations

import contextvars
import logging
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes

if TYPE_CHECKING:
    from bascule.config import TelemetrySettings

log = logging.getLogger("bascule.telemetry")

# -- Attribute and span names (docs/observability.md) -----------------------------------------

ORIGIN = "bascule.origin"
"""``source`` or ``target``: which backend a client span called."""
ROLE = "bascule.role"
"""``serve`` (a researcher's read or unjournaled request), ``write`` (a journaled write's
authoritative call), ``shadow`` (a shadow read), ``replay`` (a journaled write replayed or read
back by the resolver)."""
DATASET = "bascule.dataset"
STAGE = "bascule.stage"
OUTCOME = "bascule.outcome"
ROUTE = "http.route"
DIVERGENCE = "bascule.divergence"
"""The event a mismatch adds to its comparison span: ``bascule.pointers`` (``part:pointer``)
and ``bascule.kinds``, in the same order; never a value."""
REPLAY_SPAN = "bascule.replay"
SHADOW_SPAN = "bascule.shadow_read"
COMPARE_SPAN = "bascule.compare"

ERROR = Status(StatusCode.ERROR)
"""A span's status when what it stands for failed (a kept trace, whatever the ratio)."""
SAMPLED, UNSAMPLED = TraceFlags(TraceFlags.SAMPLED), TraceFlags(TraceFlags.DEFAULT)
RECENT = 2048
"""Traces not kept, held in memory until this many newer ones have ended, for a divergence
that names them after the fact."""
_PENDING = 10_000
"""Spans waiting for their local root to end, at most (a root that never ends: dropped)."""
_MASK64 = (1 << 64) - 1


class _State:
    ratio = 0.01
    bound = round(0.01 * (1 << 64))
    installed = False
    tail: TailProcessor | None = None
    resource: Resource | None = None


_state = _State()
_tracer = trace.get_tracer("bascule")


class _Ids(RandomIdGenerator):
    """The SDK's random ids, but for a root whose trace id was drawn (and decided on) before
    its span was made (:func:`replay`): that one, once."""

    primed: int | None = None

    def generate_trace_id(self) -> int:
        primed, self.primed = self.primed, None
        return primed if primed is not None else super().generate_trace_id()


_ids = _Ids()


def set_ratio(ratio: float) -> None:
    """The share of researchers' requests traced from their start (tests set 1.0)."""
    _state.ratio = ratio
    _state.bound = round(ratio * (1 << 64))


def sampled_id(trace_id: int) -> bool:
    """The head decision for a trace id: its low 64 bits under the ratio (as the SDK's
    ``TraceIdRatioBased``), so every process decides a trace alike."""
    return (trace_id & _MASK64) < _state.bound


class _Sampler(Sampler):
    """A server span is made only for a request already sampled by :func:`begin`: kept. A
    child of a sampled span: kept. A root (a replay) by :func:`sampled_id`. Anything else is
    recorded and left to :class:`TailProcessor`."""

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if kind is SpanKind.SERVER or (parent.is_valid and parent.trace_flags.sampled):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        if not parent.is_valid and sampled_id(trace_id):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return SamplingResult(Decision.RECORD_ONLY, attributes)

    def get_description(self) -> str:
        return f"bascule(ratio={_state.ratio}, tail)"


def _as_sampled(span: ReadableSpan) -> ReadableSpan:
    ctx = span.context
    assert ctx is not None
    return ReadableSpan(
        name=span.name,
        context=SpanContext(ctx.trace_id, ctx.span_id, False, SAMPLED, ctx.trace_state),
        parent=span.parent,
        resource=span.resource,
        attributes=span.attributes,
        events=span.events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def _worth_keeping(spans: Sequence[ReadableSpan]) -> bool:
    for span in spans:
        if span.status.status_code is StatusCode.ERROR:
            return True
        if any(event.name == DIVERGENCE for event in span.events):
            return True
    return False


class TailProcessor(SpanProcessor):
    """The only span processor of the provider: sampled spans go to the exporters at once;
    recorded-only ones wait for their trace's local root, then go if the trace failed or
    diverged, else are held (:data:`RECENT` traces) for :meth:`keep`."""

    def __init__(self) -> None:
        self.outputs: list[SpanProcessor] = []
        self._pending: dict[int, list[ReadableSpan]] = {}
        self._held: OrderedDict[int, list[Any]] = OrderedDict()
        """Spans, or an unsampled request's facts (:class:`_Facts`), by trace id."""
        self._marked: OrderedDict[int, None] = OrderedDict()
        """Trace ids a divergence named before they ended here."""

    def _emit(self, span: ReadableSpan) -> None:
        for output in self.outputs:
            output.on_end(span)

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is None:
            return
        if ctx.trace_flags.sampled:
            return self._emit(span)
        spans = self._pending.setdefault(ctx.trace_id, [])
        spans.append(span)
        parent = span.parent
        if parent is not None and not parent.is_remote:
            if len(self._pending) > _PENDING:
                self._pending.pop(next(iter(self._pending)))
            return
        self._pending.pop(ctx.trace_id, None)
        self.finished(ctx.trace_id, spans)

    def finished(self, trace_id: int, spans: list[ReadableSpan]) -> None:
        """A trace's local part is over: export it, or hold it."""
        if _worth_keeping(spans) or self._marked.pop(trace_id, 0) is None:
            for span in spans:
                self._emit(_as_sampled(span))
            return
        self._held[trace_id] = self._held.pop(trace_id, []) + spans
        while len(self._held) > RECENT:
            self._held.popitem(last=False)

    def keep(self, trace_id: int) -> None:
        spans = self._held.pop(trace_id, None)
        if spans is None:
            self._marked[trace_id] = None
            while len(self._marked) > RECENT:
                self._marked.popitem(last=False)
            return
        for span in spans:
            self._emit(_materialised(span))

    def shutdown(self) -> None:
        for output in self.outputs:
            output.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(output.force_flush(timeout_millis) for output in self.outputs)


def keep_trace(trace_id: str | int | None) -> None:
    """A divergence (or failure) was found in this trace: export what this process holds of
    it, now or when it ends."""
    if trace_id is None or _state.tail is None:
        return
    try:
        tid = trace_id if isinstance(trace_id, int) else int(trace_id, 16)
    except ValueError:
        return
    _state.tail.keep(tid)


# -- Installation ------------------------------------------------------------------------------


def install(
    settings: TelemetrySettings | None = None,
    service: str = "bascule",
    *,
    with_metrics: bool = True,
) -> None:
    """The process's tracer and meter providers, once; ``settings`` set the ratio and add the
    configured exporters (a second call with other settings adds its exporters too)."""
    from bascule import metrics

    if settings is not None:
        set_ratio(settings.sample_ratio)
    if not _state.installed:
        _state.installed = True
        _state.resource = Resource.create({"service.name": service})
        _state.tail = TailProcessor()
        provider = TracerProvider(resource=_state.resource, sampler=_Sampler(), id_generator=_ids)
        provider.add_span_processor(_state.tail)
        trace.set_tracer_provider(provider)
        if with_metrics:
            metrics.install(_state.resource, settings)
    if settings is not None and settings.exporter != "none":
        add_exporter(_span_exporter(settings), batch=settings.exporter != "console")


def add_exporter(exporter: SpanExporter, *, batch: bool = True) -> None:
    """Spans kept (sampled, failed, divergent) to ``exporter`` too (tests: in memory)."""
    install()
    assert _state.tail is not None
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    _state.tail.outputs.append(processor)


def remove_exporter(exporter: SpanExporter) -> None:
    if _state.tail is None:
        return
    _state.tail.outputs = [
        p for p in _state.tail.outputs if getattr(p, "span_exporter", None) is not exporter
    ]


def _span_exporter(settings: TelemetrySettings) -> SpanExporter:
    if settings.exporter == "console":
        return ConsoleSpanExporter(out=sys.stderr)
    if settings.exporter == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpans,
        )

        return GrpcSpans(endpoint=settings.endpoint) if settings.endpoint else GrpcSpans()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpans,
    )

    if settings.endpoint:
        return HttpSpans(endpoint=settings.endpoint.rstrip("/") + "/v1/traces")
    return HttpSpans()


# -- A researcher's request (the proxy's hot path) ------------------------------------------


class Request:
    """One researcher's request as traced: an SDK server span when sampled, else its ids and
    a few facts, turned into a span only if the request fails or diverges."""

    __slots__ = (
        "dataset",
        "method",
        "parent",
        "route",
        "span",
        "span_id",
        "stage",
        "start",
        "token",
        "trace_id",
    )

    def __init__(self, method: str, trace_id: int, span_id: int, parent: int) -> None:
        self.method = method
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent = parent
        """The researcher's span id (0: none)."""
        self.route = "unrouted"
        self.dataset: str | None = None
        self.stage: str | None = None
        self.start = time.time_ns()
        self.span: trace.Span | None = None
        self.token: object = None

    @property
    def traceparent(self) -> str:
        """What a backend is sent when no client span is made (unsampled)."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-00"

    @property
    def trace_hex(self) -> str:
        return f"{self.trace_id:032x}"


current: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "bascule_request", default=None
)
"""The researcher's request the running task serves (for the backend client and the logs)."""

_HEX = frozenset("0123456789abcdef")


def parse_traceparent(value: str | None) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a W3C ``traceparent``; None when absent or not
    one (all-zero ids, wrong lengths, version ``ff``, upper case)."""
    if value is None or len(value) < 55:
        return None
    value = value.strip()
    parts = value.split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    version, tid, sid, flags = parts[0], parts[1], parts[2], parts[3]
    if version == "00" and len(parts) != 4:
        return None
    if len(tid) != 32 or len(sid) != 16 or len(flags) != 2:
        return None
    if not (_HEX.issuperset(tid) and _HEX.issuperset(sid) and _HEX.issuperset(flags + version)):
        return None
    trace_id, span_id = int(tid, 16), int(sid, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


_bits = random.getrandbits


def begin(method: str, traceparent: str | None) -> Request:
    """A researcher's request starts: decide (head) and, when sampled, start its server span
    (named by the route template once :func:`route` knows it)."""
    bits = _bits(192)  # one draw: a trace id if none came, and the span id
    span_id = (bits & _MASK64) or 1
    incoming = parse_traceparent(traceparent) if traceparent is not None else None
    if incoming is None:
        trace_id, parent, flagged = (bits >> 64) or 1, 0, False
    else:
        trace_id, parent, flagged = incoming
    sampled = flagged or sampled_id(trace_id)
    req = Request(method, trace_id, span_id, parent)
    tail = _state.tail
    if sampled and tail is not None and tail.outputs:  # no exporter: no span to make
        ctx = None
        if parent:
            remote = SpanContext(trace_id, parent, True, SAMPLED if flagged else UNSAMPLED)
            ctx = trace.set_span_in_context(trace.NonRecordingSpan(remote))
        span = _tracer.start_span(
            f"{method} unrouted",
            context=ctx,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method},
        )
        req.span = span
        req.trace_id = span.get_span_context().trace_id
        req.span_id = span.get_span_context().span_id
        req.token = otel_context.attach(trace.set_span_in_context(span))
    current.set(req)
    return req


def route(req: Request, template: str, dataset: str, stage: str | None = None) -> None:
    req.route, req.dataset, req.stage = template, dataset, stage
    span = req.span
    if span is not None:
        span.update_name(f"{req.method} {template}")
        span.set_attributes({ROUTE: template, DATASET: dataset})
        if stage is not None:
            span.set_attribute(STAGE, stage)


def end(req: Request, status: int, error: str | None = None) -> None:
    """The request is answered (``status``; 0: no answer, the connection was cut).
    ``error``: what failed (an error class or code), if anything."""
    failed = status >= 500 or status == 0 or error is not None
    current.set(None)
    span = req.span
    if span is not None:
        if status:
            span.set_attribute("http.response.status_code", status)
        if failed:
            span.set_status(Status(StatusCode.ERROR))
            if error is not None:
                span.set_attribute("error.type", error)
        span.end()
        if req.token is not None:
            otel_context.detach(req.token)  # type: ignore[arg-type]
        return
    tail = _state.tail
    if tail is None or not tail.outputs:  # no exporter: nothing to keep it for
        return
    if failed or req.trace_id in tail._marked:
        tail._marked.pop(req.trace_id, None)
        tail._emit(_built(req, status, error, failed))
        return
    tail._held[req.trace_id] = [_Facts(req, status, error)]
    if len(tail._held) > RECENT:
        tail._held.popitem(last=False)


class _Facts:
    """An unsampled request's facts, held in place of a span until kept or forgotten."""

    __slots__ = ("end", "error", "req", "status")

    def __init__(self, req: Request, status: int, error: str | None) -> None:
        self.req, self.status, self.error, self.end = req, status, error, time.time_ns()

    @property
    def context(self) -> SpanContext:
        return SpanContext(self.req.trace_id, self.req.span_id, False, UNSAMPLED)


def _ended(
    name: str,
    context: SpanContext,
    parent: SpanContext | None,
    attributes: dict[str, Any],
    kind: SpanKind,
    status: Status,
    start: int,
    end: int,
    links: Sequence[Link] = (),
) -> ReadableSpan:
    """A span built after the fact, from what was kept of it (no SDK span was made)."""
    return ReadableSpan(
        name=name,
        context=context,
        parent=parent,
        resource=_state.resource,
        attributes=attributes,
        links=links,
        kind=kind,
        status=status,
        start_time=start,
        end_time=end,
        instrumentation_scope=None,
    )


def _built(req: Request, status: int, error: str | None, failed: bool, at: int = 0) -> ReadableSpan:
    attributes: dict[str, Any] = {"http.request.method": req.method, ROUTE: req.route}
    if req.dataset is not None:
        attributes[DATASET] = req.dataset
    if req.stage is not None:
        attributes[STAGE] = req.stage
    if status:
        attributes["http.response.status_code"] = status
    if error is not None:
        attributes["error.type"] = error
    parent = SpanContext(req.trace_id, req.parent, True, UNSAMPLED) if req.parent else None
    return _ended(
        f"{req.method} {req.route}",
        SpanContext(req.trace_id, req.span_id, False, SAMPLED),
        parent,
        attributes,
        SpanKind.SERVER,
        Status(StatusCode.ERROR) if failed else Status(StatusCode.UNSET),
        req.start,
        at or time.time_ns(),
    )


def _materialised(span: Any) -> ReadableSpan:
    if isinstance(span, _Facts):
        failed = span.status >= 500 or span.status == 0 or span.error is not None
        return _built(span.req, span.status, span.error, failed, span.end)
    return _as_sampled(span)


# -- Backend calls ----------------------------------------------------------------------------


@contextmanager
def client_span(
    method: str, origin: str, role: str, headers: list[tuple[str, str]]
) -> Iterator[trace.Span | None]:
    """A backend call: a client span when the caller is traced (its ``traceparent`` appended
    to ``headers``), else the researcher's ids alone in ``traceparent``."""
    req = current.get()
    if req is not None and req.span is None:
        headers.append(("traceparent", req.traceparent))
        yield None
        return
    parent = trace.get_current_span()
    if not parent.is_recording():
        yield None
        return
    with _tracer.start_as_current_span(
        f"{method} {role}",
        kind=SpanKind.CLIENT,
        attributes={"http.request.method": method, ORIGIN: origin, ROLE: role},
        record_exception=False,
    ) as span:
        ctx = span.get_span_context()
        flags = "01" if ctx.trace_flags.sampled else "00"
        headers.append(("traceparent", f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{flags}"))
        yield span


class Replay:
    """A replay's trace, as :func:`replay` made it: :meth:`finish` says how it ended."""

    __slots__ = (
        "attributes",
        "entry_traceparent",
        "finished",
        "replay_id",
        "req",
        "span",
    )

    def __init__(self, attributes: dict[str, Any], entry_traceparent: str | None) -> None:
        self.attributes = attributes
        self.entry_traceparent = entry_traceparent
        self.span: trace.Span | None = None
        self.req: Request | None = None
        """Unsampled: the backend call's ids (its ``traceparent``) and facts."""
        self.replay_id = 0
        """Unsampled: the span id of the replay itself, the call's parent."""
        self.finished = False

    def finish(self, status: int = 0, *, failed: bool, error: str | None = None) -> None:
        """The replay ended: its answer's ``status`` (0: none), ``failed`` or not; ``error``:
        the class of what cut its backend call, if anything (as the call's own span says)."""
        self.finished = True
        if self.span is not None:
            if status:
                self.span.set_attribute("http.response.status_code", status)
            if failed:
                self.span.set_status(ERROR)
            return
        req = self.req
        tail = _state.tail
        if req is None or not failed or tail is None or not tail.outputs:
            return
        # Built as the SDK would have recorded them: the replay, a root linked to its write,
        # and its backend call as its child (the call's answer or error class: why it failed).
        end = time.time_ns()
        replay = SpanContext(req.trace_id, self.replay_id, False, SAMPLED)
        attributes = dict(self.attributes)
        called: dict[str, Any] = {
            "http.request.method": req.method,
            ORIGIN: attributes.get(ORIGIN, ""),
            ROLE: "replay",
        }
        if status:
            attributes["http.response.status_code"] = status
            called["http.response.status_code"] = status
        if error is not None:
            called["error.type"] = error
        call_failed = error is not None or status >= 500
        tail._emit(
            _ended(
                f"{req.method} replay",
                SpanContext(req.trace_id, req.span_id, False, SAMPLED),
                replay,
                called,
                SpanKind.CLIENT,
                ERROR if call_failed else Status(StatusCode.UNSET),
                req.start,
                end,
            )
        )
        tail._emit(
            _ended(
                REPLAY_SPAN,
                replay,
                None,
                attributes,
                SpanKind.INTERNAL,
                ERROR,
                req.start,
                end,
                link_to(self.entry_traceparent),
            )
        )


@contextmanager
def replay(
    attributes: dict[str, Any], entry_traceparent: str | None, method: str
) -> Iterator[Replay]:
    """A replay (a trace of its own, linked to the write it replays): a root decided by
    :func:`sampled_id` like any other. ``method``: the one its backend call sends (a route
    with ``replay_as`` replays a write as another). Sampled, it is an SDK span with its
    backend call as a child. Unsampled, it makes no SDK span at all (a replay per write: the
    proxy's CPU per write is the budget, ``bench/dual_write.py``), but its backend call still
    carries a ``traceparent`` of its own (flag ``00``), and if it fails (or is cut by an
    exception) its span and its call's are built and exported, as the SDK's would have been
    (a failed replay is kept whatever the ratio, as a failed request is)."""
    done = Replay(attributes, entry_traceparent)
    bits = _bits(256)  # one draw: a 128-bit trace id, the replay's span id, its call's
    trace_id = (bits >> 128) or 1
    tail = _state.tail
    if tail is not None and tail.outputs and sampled_id(trace_id):
        _ids.primed = trace_id  # the span gets the trace id decided on
        with _tracer.start_as_current_span(
            REPLAY_SPAN,
            links=link_to(entry_traceparent),
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            done.span = span
            yield done
        return
    # Unsampled: the ids stand in for the spans, as an unsampled request's do. ``current``
    # names the call (its traceparent) and, for the logs, the replay's dataset and route.
    done.replay_id = ((bits >> 64) & _MASK64) or 1
    req = done.req = Request(method, trace_id, (bits & _MASK64) or 1, 0)
    req.route = str(attributes.get(ROUTE, req.route))
    dataset = attributes.get(DATASET)
    req.dataset = None if dataset is None else str(dataset)
    token = current.set(req)
    try:
        yield done
    except BaseException as exc:
        if not done.finished:  # cut by what no caller handled (its call's span said why)
            done.finish(failed=True, error=type(exc).__name__)
        raise
    finally:
        current.reset(token)


def traceparent_now() -> str | None:
    """The ``traceparent`` of what the running task serves (journaled with a write)."""
    req = current.get()
    if req is not None:
        if req.span is None:
            return req.traceparent
        ctx = req.span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    flags = "01" if ctx.trace_flags.sampled else "00"
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{flags}"


def link_to(traceparent: str | None) -> list[Link]:
    """A span link to the request a ``traceparent`` names (a replay to its write)."""
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        return []
    trace_id, span_id, sampled = parsed
    return [Link(SpanContext(trace_id, span_id, True, SAMPLED if sampled else UNSAMPLED))]


def context_of(traceparent: str | None) -> otel_context.Context | None:
    """A parent context from a ``traceparent`` (a shadow read's, in the worker)."""
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        return None
    trace_id, span_id, sampled = parsed
    remote = SpanContext(trace_id, span_id, True, SAMPLED if sampled else UNSAMPLED)
    return trace.set_span_in_context(trace.NonRecordingSpan(remote))


def trace_id_now() -> str | None:
    """The trace id of what the running task serves, in hex (logs)."""
    req = current.get()
    if req is not None:
        return req.trace_hex
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


def tracer() -> trace.Tracer:
    return _tracer
