"""The gateway's slot spans export what the SDK's own spans would, for the same calls."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import context, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, Tracer

from serving.config import TracingConfig
from serving.observability import tracing
from serving.observability.spans import SlotSpan, SlotTracer

_SERVICE = "spans-test"
_REMOTE = trace.SpanContext(
    0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, trace.TraceFlags(1)
)


def _sdk(sampler: Sampler) -> tuple[Tracer, InMemorySpanExporter]:
    """The SDK's own tracer, with the resource and the OTEL_SPAN_* limits ``configure`` uses."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        sampler=sampler,
        resource=Resource.create({"service.name": _SERVICE}),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("fermion.gateway"), exporter


def _configured(sampler: str) -> tuple[Tracer, InMemorySpanExporter]:
    """The tracer ``tracing.configure`` sets up."""
    exporter = InMemorySpanExporter()
    config = TracingConfig(sampler=sampler, service_name=_SERVICE)  # type: ignore[arg-type]
    tracing.configure(config, exporter=exporter)
    tracer = tracing.current_tracer()
    assert isinstance(tracer, SlotTracer)
    return tracer, exporter


def _slots(sampler: Sampler) -> tuple[SlotTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracer = SlotTracer(
        sampler=sampler,
        ids=RandomIdGenerator(),
        resource=Resource.create({"service.name": _SERVICE}),
        processor=SimpleSpanProcessor(exporter),
        scope=InstrumentationScope("fermion.gateway"),
        limits=SpanLimits(),
    )
    return tracer, exporter


def _calls(tracer: Tracer) -> None:
    """What the gateway does with spans, and what it might: every method, edge values."""
    remote = trace.set_span_in_context(trace.NonRecordingSpan(_REMOTE))
    server = tracer.start_span(
        "POST /v2/models/{model}/infer",
        context=remote,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": "POST", "url.path": "/v2/models/m/infer"},
    )
    server.set_attribute("fermion.request_id", "r" * 300)
    server.set_attribute("fermion.rows", 3)
    server.set_attribute("fermion.ratio", 0.25)
    server.set_attribute("fermion.shadow", False)
    server.set_attribute("fermion.shape", [1, 28, 28])
    server.set_attribute("fermion.nothing", None)  # dropped
    server.set_attribute("fermion.mixed", [1, "a"])  # dropped
    server.set_attributes({"fermion.model": "digits", "fermion.rows": 4})
    token = context.attach(trace.set_span_in_context(server))
    try:
        queue = tracer.start_span("fermion.queue", attributes={"fermion.model": "digits"})
        queue.add_event("admitted", {"fermion.position": 2})
        queue.end()
        batch = tracer.start_span(
            "fermion.batch",
            links=[Link(server.get_span_context()), Link(_REMOTE, {"why": "sibling"})],
            attributes={"fermion.batch.rows": 8},
        )
        with trace.use_span(batch, end_on_exit=True):
            with (
                pytest.raises(ValueError, match="bad rows"),
                tracer.start_as_current_span("fermion.execute") as execute,
            ):
                execute.update_name("fermion.execute.renamed")
                raise ValueError("bad rows")
            batch.set_status(StatusCode.OK)
            batch.set_status(Status(StatusCode.ERROR, "ignored: OK is final"))
        with tracer.start_as_current_span(
            "fermion.route", record_exception=False, set_status_on_exception=False
        ):
            pass
        # The gateway's own children, started under a span that need not be current.
        tracing.start_child(
            tracer,
            server,
            "fermion.child",
            {"fermion.model": "digits", "fermion.rows": 2, "": 1, "fermion.shape": [1, 2]},
            [Link(_REMOTE, {"why": "sibling"})],
        ).end()
        tracing.start_child(tracer, trace.NonRecordingSpan(_REMOTE), "fermion.remote.child").end()
        server.add_event("fermion.retry", {"fermion.attempt": 1, "fermion.why": "overloaded"})
        server.record_exception(KeyError("k"), {"fermion.extra": 1}, escaped=True)
        server.set_status(StatusCode.UNSET)
        server.set_status(Status(StatusCode.ERROR, "boom"))
    finally:
        context.detach(token)
    server.end()
    server.set_attribute("after.end", 1)  # ignored: the span is exported already
    server.end()  # a second end exports nothing more
    tracing.start_child(tracer, server, "fermion.after.end", {"fermion.rows": 1}).end()
    # A root: a trace of its own, whatever span is current.
    with tracer.start_as_current_span("fermion.background", context=Context()) as root:
        tracer.start_span("fermion.background.step").end()
        root.set_attribute("fermion.rows", 1)


def _view(spans: tuple[ReadableSpan, ...]) -> list[dict[str, Any]]:
    """Each span as what an exporter reads, ids replaced by their place in ``spans`` (a
    new trace's id by the order it first appears in)."""
    ids = {s.context.span_id: i for i, s in enumerate(spans) if s.context is not None}
    traces = {_REMOTE.trace_id: "remote"}
    for s in spans:
        assert s.context is not None
        traces.setdefault(s.context.trace_id, f"trace {len(traces)}")

    def ref(ctx: trace.SpanContext | None) -> Any:
        if ctx is None:
            return None
        return ids.get(ctx.span_id, (ctx.trace_id, ctx.span_id, ctx.is_remote))

    views = []
    for s in spans:
        assert s.context is not None and s.start_time is not None and s.end_time is not None
        assert s.start_time <= s.end_time
        views.append(
            {
                "name": s.name,
                "kind": s.kind,
                "trace": traces[s.context.trace_id],
                "flags": s.context.trace_flags,
                "state": s.context.trace_state,
                "parent": ref(s.parent),
                "attributes": dict(s.attributes or {}),
                "dropped_attributes": s.dropped_attributes,
                "events": [
                    (
                        e.name,
                        {
                            k: v if k != "exception.stacktrace" else str(v).startswith("Traceback")
                            for k, v in (e.attributes or {}).items()
                        },
                    )
                    for e in s.events
                ],
                "dropped_events": s.dropped_events,
                "links": [(ref(link.context), dict(link.attributes or {})) for link in s.links],
                "dropped_links": s.dropped_links,
                "status": (s.status.status_code, s.status.description),
                "resource": s.resource.attributes,
                "scope": s.instrumentation_scope,
            }
        )
    return views


@pytest.fixture(autouse=True)
def _no_tracer() -> Iterator[None]:
    yield
    tracing.shutdown()


@pytest.mark.parametrize(
    "limits",
    [
        {},
        {
            "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "3",
            "OTEL_SPAN_EVENT_COUNT_LIMIT": "1",  # the server span's first event is dropped
            "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "8",
        },
        {
            "OTEL_SPAN_LINK_COUNT_LIMIT": "1",
            "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT": "2",
            "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "5",
        },
        {
            "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "0",
            "OTEL_SPAN_EVENT_COUNT_LIMIT": "0",
            "OTEL_SPAN_LINK_COUNT_LIMIT": "0",
        },
    ],
    ids=[
        "default limits",
        "few attributes and events",
        "few links, short values",
        "nothing kept",
    ],
)
@pytest.mark.parametrize(
    ("name", "sampler"),
    [("always_on", ALWAYS_ON), ("parentbased_always_off", ParentBased(ALWAYS_OFF))],
    ids=["always_on", "parentbased_always_off"],
)
def test_configured_spans_export_what_the_sdk_exports(
    monkeypatch: pytest.MonkeyPatch, limits: dict[str, str], name: str, sampler: Sampler
) -> None:
    for key, value in limits.items():
        monkeypatch.setenv(key, value)
    made: dict[str, list[dict[str, Any]]] = {}
    for kind, (tracer, exporter) in (("sdk", _sdk(sampler)), ("slots", _configured(name))):
        _calls(tracer)
        made[kind] = _view(exporter.get_finished_spans())
    # The root and its child only where the sampler records new traces.
    assert len(made["sdk"]) == (10 if name == "always_on" else 8)
    assert made["slots"] == made["sdk"]


def test_a_transports_root_carries_the_flags_the_sdk_gives_a_root() -> None:
    sdk_tracer, _ = _sdk(ALWAYS_ON)
    expected = sdk_tracer.start_span("root", context=Context()).get_span_context().trace_flags
    tracer, exporter = _configured("always_on")
    trace_id, recorded = tracing.new_root()
    span = tracing.start_server_span(tracer, "root", parent=None, root=trace_id, attributes={})
    assert recorded and span.get_span_context().trace_flags == expected
    token = tracing.make_current(span)
    try:  # what goes downstream says the same
        assert tracing.inject_context()["traceparent"].endswith(f"-{expected:02x}")
    finally:
        tracing.detach(token)
    span.end()
    assert exporter.get_finished_spans()[0].context.trace_flags == expected


def test_a_child_of_a_recording_slot_span_skips_the_sampler() -> None:
    asked: list[str] = []

    class Counting(Sampler):
        def should_sample(self, *args: Any, **kwargs: Any) -> Any:
            asked.append(args[2])
            return ALWAYS_ON.should_sample(*args, **kwargs)

        def get_description(self) -> str:
            return "counting"

    tracer, exporter = _slots(Counting())
    root = tracer.start_span("root")
    child = tracer.start_span("child", context=trace.set_span_in_context(root))
    assert isinstance(child, SlotSpan) and asked == ["root"]
    child.end()
    root.end()
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["child", "root"]
    assert spans[0].parent == root.get_span_context()
    assert spans[0].context.trace_id == spans[1].context.trace_id


def test_a_root_the_sampler_dropped_is_not_recorded() -> None:
    tracer, exporter = _slots(ALWAYS_OFF)
    span = tracer.start_root("root", 0xABC, sampled=False, kind=SpanKind.SERVER)
    assert not span.is_recording() and not span.get_span_context().trace_flags.sampled
    assert span.get_span_context().trace_id == 0xABC
    child = tracer.start_span("child", context=trace.set_span_in_context(span))
    assert not child.is_recording()
    span.end()
    child.end()
    assert exporter.get_finished_spans() == ()
