"""OpenTelemetry traces: set-up from config, context propagation, span helpers.

Off by default (``tracing.exporter: none``): then nothing is added to the request
path and ``current_tracer()`` is None, which every helper's caller checks first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context, trace
from opentelemetry.trace import Link, Span, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from serving.config import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "PROPAGATOR",
    "configure",
    "current_tracer",
    "extract_context",
    "inject_context",
    "recording_tracer",
    "shutdown",
    "start_batch_spans",
    "start_queue_span",
]

#: The W3C trace-context propagator every transport uses.
PROPAGATOR = TraceContextTextMapPropagator()


class _State:
    tracer: Tracer | None = None
    provider: TracerProvider | None = None


def current_tracer() -> Tracer | None:
    """The gateway's tracer, or None while tracing is off."""
    return _State.tracer


def recording_tracer() -> Tracer | None:
    """The tracer when the current span records (a sampled request), else None.

    Child spans of a request that was sampled out are never created.
    """
    tracer = _State.tracer
    if tracer is None or not trace.get_current_span().is_recording():
        return None
    return tracer


def _exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.endpoint, headers=dict(config.headers))


def configure(
    config: TracingConfig, *, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """Set up this process's tracer from ``config`` (or with ``exporter``); None when off.

    Replaces any earlier setup, which is shut down first.
    """
    shutdown()
    if exporter is None and config.exporter == "none":
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    if exporter is not None or config.exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(exporter or _exporter(config)))
    else:
        provider.add_span_processor(BatchSpanProcessor(_exporter(config)))
    _State.provider = provider
    _State.tracer = provider.get_tracer("fermion.gateway")
    return provider


def inject_context() -> dict[str, str]:
    """The current trace context as W3C headers, to carry across a process hop.

    Empty when tracing is off or the current request was sampled out.
    """
    if _State.tracer is None or not trace.get_current_span().is_recording():
        return {}
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier)
    return carrier


def extract_context(carrier: dict[str, str]) -> context.Context:
    """The trace context that ``inject_context`` put in ``carrier``."""
    return PROPAGATOR.extract(carrier)


def shutdown() -> None:
    """Flush and stop the tracer set up by ``configure``; tracing is off afterwards."""
    provider, _State.provider, _State.tracer = _State.provider, None, None
    if provider is not None:
        provider.shutdown()


def start_queue_span(tracer: Tracer, attributes: Mapping[str, Any]) -> tuple[Span, Span]:
    """The current (request) span, and a new queue-wait span under it."""
    return trace.get_current_span(), tracer.start_span("fermion.queue", attributes=attributes)


def start_batch_spans(
    tracer: Tracer, requests: Sequence[Span], attributes: Mapping[str, Any]
) -> tuple[Span, Span]:
    """A batch span (child of the first request, linked to all) and its executor-run span."""
    links = [Link(s.get_span_context()) for s in requests if s.get_span_context().is_valid]
    batch = tracer.start_span(
        "fermion.batch",
        context=trace.set_span_in_context(requests[0]),
        links=links,
        attributes=attributes,
    )
    run = tracer.start_span(
        "fermion.execute", context=trace.set_span_in_context(batch), attributes=attributes
    )
    return batch, run
