"""Fermion's OTLP span encoding is the SDK's own message, field for field."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from serving.observability import otlp_wire
from serving.observability.otlp_wire import encode_spans
from tests.helpers.spies import spy

REMOTE = SpanContext(
    trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
    span_id=0x00F067AA0BA902B7,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "value"), ("other", "x")]),
)


def _provider(resource: Resource) -> tuple[TracerProvider, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


def _every_kind_of_span() -> Sequence[ReadableSpan]:
    """Spans with what a span can hold: every attribute type, events, links, a remote
    parent and a trace state, every kind and status, two scopes and two resources."""
    spans: list[ReadableSpan] = []
    for service in ("fermion", "fermion-edge"):
        provider, memory = _provider(
            Resource.create({"service.name": service, "host.cores": 2, "ratio": 0.5})
        )
        gateway = provider.get_tracer("fermion", "1.2.3", schema_url="https://schema/1")
        other = provider.get_tracer("fermion.replica")
        parent = trace.set_span_in_context(trace.NonRecordingSpan(REMOTE))
        with gateway.start_as_current_span(
            "POST /v2/models/{model}/infer",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": "POST",
                "http.response.status_code": 200,
                "negative": -7,
                "big": 2**62,
                "ratio": 0.25,
                "zero": 0,
                "empty": "",
                "flag": False,
                "ok": True,
                "unicode": "déjà vu ✓",
                "long": "x" * 300,
                "ints": [1, -2, 3],
                "strs": ("a", "", "c"),
                "floats": [0.5, -1.0],
                "bools": [True, False],
            },
        ) as root:
            root.add_event("retry", {"attempt": 2, "why": "replica gone"})
            root.add_event("bare")
            for kind in (SpanKind.INTERNAL, SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER):
                with other.start_as_current_span(f"child-{kind.name}", kind=kind) as child:
                    child.set_status(Status(StatusCode.OK))
            with gateway.start_as_current_span(
                "fermion.batch",
                links=[
                    Link(REMOTE, {"fermion.request": "r1"}),
                    Link(root.get_span_context()),
                ],
            ) as batch:
                batch.set_status(Status(StatusCode.ERROR, "replica failed"))
        with gateway.start_as_current_span("root without parent") as lone:
            lone.set_status(Status(StatusCode.ERROR))
        spans += memory.get_finished_spans()
        provider.shutdown()
    return spans


def _same_as_the_sdk(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    ours = ExportTraceServiceRequest.FromString(encode_spans(spans))
    theirs = sdk_encode(spans)
    assert ours == theirs
    return ours


def test_every_kind_of_span_encodes_as_the_sdk_encodes_it() -> None:
    spans = _every_kind_of_span()
    message = _same_as_the_sdk(spans)
    assert len(message.resource_spans) == 2
    assert [len(rs.scope_spans) for rs in message.resource_spans] == [2, 2]
    names = [s.name for rs in message.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert len(names) == len(spans) == 14
    # Encoded twice, the remembered attributes give the same bytes.
    assert encode_spans(spans) == encode_spans(spans)


def test_spans_of_interleaved_resources_group_as_the_sdk_groups_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spans = _every_kind_of_span()
    first, second = spans[:7], spans[7:]
    interleaved = [s for pair in zip(first, second, strict=True) for s in pair]
    message = _same_as_the_sdk(interleaved)
    assert len(message.resource_spans) == 2
    # A resource is hashed once per run of spans that share it, not once per span.
    hashed = spy(monkeypatch, Resource, "__hash__")
    encode_spans(first)
    assert len(hashed) == 1
    hashed.clear()
    encode_spans(interleaved)
    assert len(hashed) == len(interleaved)


def test_no_spans_is_an_empty_request() -> None:
    assert encode_spans([]) == b""
    assert sdk_encode([]).SerializeToString() == b""


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31, 2**63 - 1, -1, -(2**63)])
def test_integers_of_every_width_survive(value: int) -> None:
    provider, memory = _provider(Resource.create({}))
    with provider.get_tracer("t").start_as_current_span("s", attributes={"n": value}):
        pass
    message = _same_as_the_sdk(memory.get_finished_spans())
    (span,) = message.resource_spans[0].scope_spans[0].spans
    assert span.attributes[0].value.int_value == value
    provider.shutdown()


def test_long_values_are_encoded_each_time_and_short_ones_remembered() -> None:
    otlp_wire._key_values.clear()
    provider, memory = _provider(Resource.create({}))
    long_text = "frame\n" * 1000
    with provider.get_tracer("t").start_as_current_span(
        "s", attributes={"short": "digits", "long": long_text, "n": 3}
    ):
        pass
    spans = memory.get_finished_spans()
    _same_as_the_sdk(spans)
    remembered = {key for _, key, _, _ in otlp_wire._key_values}
    assert {"short", "n"} <= remembered and "long" not in remembered
    provider.shutdown()


def test_an_attribute_protobuf_cannot_hold_is_left_out_as_the_sdk_leaves_it_out() -> None:
    provider, memory = _provider(Resource.create({}))
    with provider.get_tracer("t").start_as_current_span(
        "s", attributes={"lone surrogate": "\ud800", "kept": "x"}
    ):
        pass
    message = _same_as_the_sdk(memory.get_finished_spans())
    (span,) = message.resource_spans[0].scope_spans[0].spans
    assert [a.key for a in span.attributes] == ["kept"]
    provider.shutdown()
