"""OpenTelemetry traces: set-up from config and the ``OTEL_*`` environment, context
propagation, span helpers.

Off by default (``tracing.exporter: none`` and no ``OTEL_*`` variable asking for an
exporter): then nothing is added to the request path and ``current_tracer()`` is None,
which every helper's caller checks first.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, get_args

from opentelemetry import context, trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_TRACE_ID, Link, Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from serving.config import TracingConfig
from serving.observability.otlp_export import otlp_exporter
from serving.observability.spans import SlotTracer

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

    from serving.observability.span_batches import BatchingSpanProcessor

__all__ = [
    "EXPORT_BATCH",
    "EXPORT_METRICS",
    "PROPAGATOR",
    "SHUTDOWN_WAIT_S",
    "configure",
    "current_tracer",
    "detach",
    "extract_context",
    "inject_context",
    "make_current",
    "mark_sampled_out",
    "new_root",
    "recording_span",
    "recording_tracer",
    "resolve",
    "shutdown",
    "start_batch_spans",
    "start_child",
    "start_server_span",
    "unmark_sampled_out",
]

#: The W3C trace-context propagator every transport uses.
PROPAGATOR = TraceContextTextMapPropagator()
#: Spans per OTLP export unless ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` says otherwise.
EXPORT_BATCH = 64
#: Longest wait for the last spans to be exported at shutdown (a dead collector or
#: one that never answers must not hold the process up).
SHUTDOWN_WAIT_S = 1.0

_SAMPLERS = frozenset(get_args(TracingConfig.model_fields["sampler"].annotation))

#: True in the context of a request sampled out (``mark_sampled_out``), until a span is
#: made current there (``make_current``, the only way the gateway does that): nothing
#: under such a request records, so ``recording_tracer`` answers without asking
#: OpenTelemetry's context for the current span (two asks a request, about 8 µs of a
#: guarded request's time in ``bench.gateway_overhead``).
_SAMPLED_OUT: ContextVar[bool] = ContextVar("fermion_sampled_out", default=False)
_HTTP_DEFAULT = "http://127.0.0.1:4318/v1/traces"
_GRPC_DEFAULT = "http://127.0.0.1:4317"
#: The instrumentation scope of the gateway's spans.
_SCOPE = "fermion.gateway"


def _env(environ: Mapping[str, str], *names: str) -> str | None:
    """The first of ``names`` set (non-empty) in ``environ``."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def _headers(text: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` (values URL-encoded), as OTEL_EXPORTER_OTLP_HEADERS writes them."""
    pairs = (part.partition("=") for part in text.split(",") if "=" in part)
    return {k.strip(): urllib.parse.unquote(v.strip()) for k, _, v in pairs if k.strip()}


def resolve(config: TracingConfig, environ: Mapping[str, str] | None = None) -> TracingConfig:
    """``config`` with every key the file left out taken from the ``OTEL_*`` environment.

    A key set in the file wins. The exporter comes from ``OTEL_TRACES_EXPORTER`` (otlp,
    console, none) or, when only an OTLP endpoint is set, is OTLP; ``OTEL_SDK_DISABLED``
    turns it off. The protocol (``grpc`` or ``http/protobuf``) picks otlp-grpc or
    otlp-http. A generic ``OTEL_EXPORTER_OTLP_ENDPOINT`` gets ``/v1/traces`` appended for
    HTTP, as the specification says; a traces endpoint is used as it is.
    """
    env = os.environ if environ is None else environ
    given = config.model_fields_set
    values: dict[str, Any] = config.model_dump()
    protocol = _env(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    otlp = "otlp-grpc" if protocol == "grpc" else "otlp-http"
    if "exporter" not in given:
        chosen = (_env(env, "OTEL_TRACES_EXPORTER") or "").split(",")[0].strip().lower()
        if (_env(env, "OTEL_SDK_DISABLED") or "").lower() == "true":
            values["exporter"] = "none"
        elif chosen in ("none", "console"):
            values["exporter"] = chosen
        elif chosen == "otlp" or _env(
            env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"
        ):
            values["exporter"] = otlp
    if "endpoint" not in given or values["endpoint"] is None:
        grpc = values["exporter"] == "otlp-grpc"
        endpoint = _env(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        base = _env(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint is None and base is not None:
            endpoint = base if grpc else base.rstrip("/") + "/v1/traces"
        values["endpoint"] = endpoint or (_GRPC_DEFAULT if grpc else _HTTP_DEFAULT)
    if "headers" not in given:
        raw = _env(env, "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
        values["headers"] = _headers(raw) if raw else {}
    if "sampler" not in given and "sample_ratio" not in given:
        sampler = (_env(env, "OTEL_TRACES_SAMPLER") or "").lower()
        if sampler in _SAMPLERS:
            values["sampler"] = sampler
        arg = _env(env, "OTEL_TRACES_SAMPLER_ARG")
        if arg is not None:
            with contextlib.suppress(ValueError):
                values["sample_ratio"] = min(max(float(arg), 0.0), 1.0)
    if "service_name" not in given:
        values["service_name"] = _env(env, "OTEL_SERVICE_NAME") or config.service_name
    return TracingConfig.model_validate(values)


class _State:
    tracer: Tracer | None = None
    provider: TracerProvider | None = None
    #: The processor that batches spans for the OTLP exporter (or the export process).
    exporting: BatchingSpanProcessor | None = None
    #: A root is sampled when the low 64 bits of its trace id are below this (the SDK's
    #: rule for ratio samplers; 0 for always_off, 2**64 for always_on).
    root_bound: int = 0


#: The bits of a trace id a ratio sampler looks at (the SDK's TRACE_ID_LIMIT).
_TRACE_ID_LIMIT = (1 << 64) - 1


def new_root() -> tuple[int, bool]:
    """A new trace id for a request that carries no trace context, and whether the
    sampler records its trace.

    The decision comes before any span is built: a request sampled out (most of them, at
    a low ratio) costs a random number, and its id still reaches the access log. A
    recorded one gets its span from ``start_server_span`` with this id, which the sampler
    decides the same way again.
    """
    trace_id = random.getrandbits(128)
    while trace_id == INVALID_TRACE_ID:  # pragma: no cover - one chance in 2**128
        trace_id = random.getrandbits(128)
    if _State.tracer is None:
        return trace_id, False
    return trace_id, _root_sampled(trace_id)


def _root_sampled(trace_id: int) -> bool:
    # The configured sampler's own rule for a root, without building its SamplingResult
    # (a tenth of the cost; the test holds it to the SDK's decision).
    return (trace_id & _TRACE_ID_LIMIT) < _State.root_bound


def start_server_span(
    tracer: Tracer,
    name: str,
    *,
    parent: Context | None,
    root: int,
    attributes: Mapping[str, Any],
) -> Span:
    """A transport's server span: a child of the incoming ``parent`` context, or without
    one a root (whatever span is current) in the trace ``root`` that ``new_root`` chose."""
    if parent is None and isinstance(tracer, SlotTracer):
        sampled = _root_sampled(root)
        return tracer.start_root(
            name, root, sampled=sampled, kind=SpanKind.SERVER, attributes=attributes
        )
    # A remote parent: the sampler decides. (Any other tracer is the SDK's no-op one,
    # under OTEL_SDK_DISABLED.)
    context = parent if parent is not None else Context()
    return tracer.start_span(name, context=context, kind=SpanKind.SERVER, attributes=attributes)


def current_tracer() -> Tracer | None:
    """The gateway's tracer, or None while tracing is off."""
    return _State.tracer


def recording_tracer() -> Tracer | None:
    """The tracer when the current span records (a sampled request), else None.

    Child spans of a request that was sampled out are never created.
    """
    recording = recording_span()
    return None if recording is None else recording[0]


def recording_span() -> tuple[Tracer, Span] | None:
    """The tracer and the current span when that span records (a sampled request's),
    else None: what ``start_child`` needs to start a span under it."""
    tracer = _State.tracer
    if tracer is None or _SAMPLED_OUT.get():
        return None
    span = trace.get_current_span()
    return (tracer, span) if span.is_recording() else None


def mark_sampled_out() -> Token[bool]:
    """Note, for the rest of this task's request, that it was sampled out (no span made
    current); ``unmark_sampled_out`` with the token ends the note."""
    return _SAMPLED_OUT.set(True)


def unmark_sampled_out(token: Token[bool]) -> None:
    """End the note ``mark_sampled_out`` made (a task may serve several requests)."""
    _SAMPLED_OUT.reset(token)


def _exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    return otlp_exporter(config.exporter, _endpoint(config), config.headers)


def _endpoint(config: TracingConfig) -> str:
    """The OTLP endpoint ``config`` exports to (its own, else the local collector's)."""
    if config.endpoint:
        return config.endpoint
    return _GRPC_DEFAULT if config.exporter == "otlp-grpc" else _HTTP_DEFAULT


def _env_int(name: str, default: int) -> int:
    """A positive whole number from the environment, else ``default``."""
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def _root_sampler(config: TracingConfig) -> Sampler:
    """What ``config``'s sampler decides for a root (a ``parentbased_`` one defers to it)."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, TraceIdRatioBased

    return {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(config.sample_ratio),
    }.get(config.sampler.removeprefix("parentbased_"), ALWAYS_ON)


def _root_bound(root: Sampler) -> int:
    """``_State.root_bound`` for the root sampler ``_root_sampler`` built."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, TraceIdRatioBased

    if isinstance(root, TraceIdRatioBased):
        return root.bound
    return 0 if root is ALWAYS_OFF else _TRACE_ID_LIMIT + 1


def configure(
    config: TracingConfig, *, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """Set up this process's tracer from ``config`` and the environment (or with
    ``exporter``); None when off.

    Replaces any earlier setup, which is shut down first.
    """
    shutdown()
    config = resolve(config)
    if exporter is None and config.exporter == "none":
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace import Tracer as SdkTracer
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    root = _root_sampler(config)
    sampler = ParentBased(root) if config.sampler.startswith("parentbased_") else root
    resource = Resource.create({"service.name": config.service_name})
    provider = TracerProvider(
        # OTEL_RESOURCE_ATTRIBUTES are merged in; the service name given here wins.
        resource=resource,
        sampler=sampler,
        shutdown_on_exit=False,  # shutdown() below bounds the wait; an atexit hook would not
    )
    processor: SpanProcessor
    exporting: BatchingSpanProcessor | None = None
    batch = _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", EXPORT_BATCH)
    delay_s = _env_int("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
    queue = _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
    if exporter is not None or config.exporter == "console":
        processor = SimpleSpanProcessor(exporter or _exporter(config))
    elif config.export_process:
        # Here, not at the top: importing this module loads no SDK.
        from serving.observability.export_process import ProcessSpanProcessor

        processor = exporting = ProcessSpanProcessor(
            config.exporter,
            _endpoint(config),
            config.headers,
            config.service_name,
            batch=batch,
            delay_s=delay_s,
            max_queue=queue,
        )
    else:
        from serving.observability.span_batches import ThreadSpanProcessor

        # The exporter encodes a batch holding the GIL: the SDK's 512 spans stall the
        # event loop for ~20 ms at a time; EXPORT_BATCH spans, a few ms (more often).
        processor = exporting = ThreadSpanProcessor(
            _exporter(config),
            batch=batch,
            delay_s=delay_s,
            max_queue=queue,
        )
    provider.add_span_processor(processor)  # its shutdown flushes and stops the processor
    sdk_tracer = provider.get_tracer(_SCOPE)
    tracer: Tracer = sdk_tracer
    if isinstance(sdk_tracer, SdkTracer):  # else OTEL_SDK_DISABLED: the SDK's no-op tracer
        tracer = SlotTracer(
            sampler=sampler,
            ids=provider.id_generator,
            resource=resource,
            processor=processor,
            scope=InstrumentationScope(_SCOPE, ""),  # as the SDK's get_tracer names it
            limits=SpanLimits(),
        )
    _State.provider = provider
    _State.exporting = exporting
    _State.root_bound = _root_bound(root)
    _State.tracer = tracer
    return provider


def inject_context() -> dict[str, str]:
    """The current trace context as W3C headers, to carry across a process hop.

    Empty when tracing is off or the current request was sampled out.
    """
    if recording_tracer() is None:
        return {}
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier)
    return carrier


def extract_context(carrier: dict[str, str]) -> context.Context:
    """The trace context that ``inject_context`` put in ``carrier``."""
    return PROPAGATOR.extract(carrier)


def shutdown() -> None:
    """Flush and stop the tracer set up by ``configure``; tracing is off afterwards.

    Waits at most ``SHUTDOWN_WAIT_S`` for the last export: spans a dead collector
    would not take are dropped rather than holding the process up.
    """
    provider, _State.provider, _State.tracer = _State.provider, None, None
    _State.root_bound = 0
    _State.exporting = None
    if provider is None:
        return
    flushing = threading.Thread(target=provider.shutdown, name="fermion-trace-flush", daemon=True)
    flushing.start()
    flushing.join(SHUTDOWN_WAIT_S)


def start_child(
    tracer: Tracer,
    parent: Span,
    name: str,
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[Link] = (),
) -> Span:
    """An internal span under ``parent`` (current or not), as ``tracer.start_span`` with
    ``parent`` current would start it."""
    if isinstance(tracer, SlotTracer):
        return tracer.start_child(parent, name, attributes, links)
    context = trace.set_span_in_context(parent)
    return tracer.start_span(name, context=context, attributes=attributes, links=links)


def make_current(span: Span, parent: Context | None = None) -> Token[Context]:
    """Make ``span`` the current span of this task until ``detach`` gets the token back.

    ``parent``: the context it is set in (an incoming request's extracted context); None:
    the current one. A transport makes its server span current for the whole call, and
    the batcher a batch's executor-run span while the backend runs it, so that what is
    started or propagated meanwhile (the replica's span over Ray) is its child.
    """
    if _SAMPLED_OUT.get():
        _SAMPLED_OUT.set(False)  # (a batch's span, in a task a sampled-out request began)
    return context.attach(trace.set_span_in_context(span, parent))


def detach(token: Token[Context]) -> None:
    """Restore the current span ``make_current`` replaced."""
    context.detach(token)


def start_batch_spans(
    tracer: Tracer, requests: Sequence[Span], attributes: Mapping[str, Any]
) -> tuple[Span, Span]:
    """A batch span (child of the first request, linked to all) and its executor-run span."""
    links = [Link(s.get_span_context()) for s in requests if s.get_span_context().is_valid]
    batch = start_child(tracer, requests[0], "fermion.batch", attributes, links)
    return batch, start_child(tracer, batch, "fermion.execute", attributes)


class ExportMetrics:
    """``fermion_trace_spans_dropped_total`` while spans are exported over OTLP: finished,
    sampled spans not exported (a full queue behind a collector that stopped answering,
    an export the collector refused or that failed after its retries, an export process
    that died)."""

    def collect(self) -> Iterator[Metric]:
        exporting = _State.exporting
        if exporting is None:
            return
        yield CounterMetricFamily(
            "fermion_trace_spans_dropped",
            "Finished, sampled spans not exported: the queue was full, or the export failed.",
            value=exporting.dropped,
        )


#: The one collector of the tracer's metrics (what ``configure`` set up, as of a scrape).
EXPORT_METRICS = ExportMetrics()
