"""OTLP export from a child process: the spans that reach the collector are the spans
the gateway finished, and nothing the child does can hold the gateway up."""

from __future__ import annotations

import marshal
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from model_store.store import ModelStore
from serving.config import FermionConfig, TracingConfig
from serving.observability import tracing
from serving.observability.export_process import ProcessSpanProcessor, readable_span, span_record
from serving.observability.otlp_wire import encode_spans
from tests.helpers.inprocess import digits_body, serve_in_process
from tests.helpers.otlp_collector import (
    finished_spans,
    otlp_collector,
    otlp_grpc_collector,
    service_names,
    span_names,
)
from tests.helpers.prom import metric_value
from tests.serving.observability.test_otlp_wire import _every_kind_of_span
from tests.serving.observability.test_spans import _calls, _sdk, _view
from tests.serving.observability.test_tracing import _dropped_spans


def _through_the_pipe(spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    """``spans`` as the child rebuilds them: recorded, marshalled, read back."""
    records = marshal.loads(marshal.dumps([span_record(s) for s in spans]))
    return [readable_span(r, s.resource) for r, s in zip(records, spans, strict=True)]


def test_every_kind_of_span_is_encoded_the_same_after_the_pipe() -> None:
    spans = tuple(_every_kind_of_span())
    expected = ExportTraceServiceRequest.FromString(encode_spans(spans))
    assert ExportTraceServiceRequest.FromString(encode_spans(_through_the_pipe(spans))) == (
        expected
    )


@pytest.mark.parametrize(
    "limits",
    [
        {"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "3", "OTEL_SPAN_EVENT_COUNT_LIMIT": "1"},
        {"OTEL_SPAN_LINK_COUNT_LIMIT": "1", "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT": "1"},
    ],
    ids=["dropped attributes and events", "dropped links and event attributes"],
)
def test_what_the_limits_dropped_is_still_counted_after_the_pipe(
    monkeypatch: pytest.MonkeyPatch, limits: dict[str, str]
) -> None:
    for key, value in limits.items():
        monkeypatch.setenv(key, value)
    tracer, exporter = _sdk(ALWAYS_ON)
    _calls(tracer)
    spans = exporter.get_finished_spans()
    views = _view(spans)
    assert any(v["dropped_attributes"] or v["dropped_events"] or v["dropped_links"] for v in views)
    assert _view(tuple(_through_the_pipe(spans))) == views


def _wait(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    """Until ``condition`` holds (the child may still be starting), failing after
    ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come to hold"
        time.sleep(0.02)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A child that exited but was not reaped yet is gone too.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1].startswith("Z")


@contextmanager
def _processor(url: str, batch: int = 4, delay_s: float = 5.0) -> Iterator[ProcessSpanProcessor]:
    processor = ProcessSpanProcessor(
        "otlp-http",
        url,
        {"x-tenant": "blue"},
        "fermion-child",
        batch=batch,
        delay_s=delay_s,
        max_queue=64 * batch,
    )
    try:
        yield processor
    finally:
        processor.shutdown(timeout_millis=5000)


def test_spans_reach_the_collector_from_the_child_and_the_child_ends_with_shutdown() -> None:
    with otlp_collector() as collector, _processor(collector.url) as processor:
        pid = processor.child_pid
        assert pid is not None and pid != os.getpid()
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:  # headers hold credentials
            assert b"x-tenant" not in cmdline.read()
        for span in finished_spans(10):  # 2 batches of 4, and 2 that wait for the delay
            processor.on_end(span)
        _wait(lambda: len(span_names(collector.received)) == 8)
        processor.shutdown(timeout_millis=10_000)  # the last 2 go with the end
        assert span_names(collector.received) == [f"request-{i}" for i in range(10)]
        assert _gone(pid)
        assert {h.get("x-tenant") for h in collector.headers} == {"blue"}
        assert service_names(collector.received) == {"fermion-child"}
    assert processor.dropped == 0


def test_spans_that_wait_are_sent_after_the_delay_without_a_full_batch() -> None:
    with otlp_collector() as collector, _processor(collector.url, delay_s=0.2) as processor:
        for span in finished_spans(3):
            processor.on_end(span)
        _wait(lambda: len(span_names(collector.received)) == 3)


def test_a_child_that_died_is_started_again_and_the_spans_after_it_arrive() -> None:
    with otlp_collector() as collector, _processor(collector.url, batch=1) as processor:
        first = processor.child_pid
        assert first is not None
        spans = finished_spans(6)
        processor.on_end(spans[0])
        _wait(lambda: len(span_names(collector.received)) == 1)
        os.kill(first, signal.SIGKILL)  # (the child this test's processor started)
        _wait(lambda: _gone(first))
        time.sleep(1.1)  # a child is started again at most once a second
        for span in spans[1:]:
            processor.on_end(span)
            assert processor.force_flush(10_000)
        _wait(lambda: "request-5" in span_names(collector.received))
        assert processor.child_pid not in (None, first)
        # The first write after the death may have gone to the dead child's pipe.
        delivered = set(span_names(collector.received))
        assert len(delivered) + processor.dropped >= 6
        assert {f"request-{i}" for i in (0, 2, 3, 4, 5)} <= delivered


def test_a_collector_that_never_answers_costs_dropped_spans_not_a_blocked_caller() -> None:
    # A listening socket nobody accepts from: the child's first post waits out its
    # timeout, the pipe behind it fills, then the processor's queue.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(1)
        url = f"http://127.0.0.1:{hole.getsockname()[1]}/v1/traces"
        tracer, exporter = _sdk(ALWAYS_ON)
        tracer.start_span("big", attributes={"fermion.payload": "x" * 100_000}).end()
        (big,) = exporter.get_finished_spans()
        processor = ProcessSpanProcessor(
            "otlp-http", url, {}, "fermion-child", batch=1, max_queue=2
        )
        pid = processor.child_pid
        assert pid is not None
        for _ in range(200):  # 20 MB: far more than a pipe holds
            processor.on_end(big)
        _wait(lambda: processor.dropped > 0)
        processor.shutdown(timeout_millis=500)
        assert _gone(pid)


async def test_the_gateway_exports_through_the_child(demo_store: ModelStore) -> None:
    with otlp_grpc_collector() as collector:
        config = FermionConfig(
            tracing=TracingConfig(
                exporter="otlp-grpc", endpoint=collector.endpoint, export_process=True
            )
        )
        async with serve_in_process(config, demo_store) as gw:
            r = await gw.client.post("/v2/models/digits/infer", json=digits_body())
            assert r.status_code == 200
            metrics = (await gw.client.get("/metrics")).text
            assert metric_value(metrics, "fermion_trace_spans_dropped_total") == 0.0
        _wait(lambda: "fermion.execute" in span_names(collector.received))
    names = set(span_names(collector.received))
    assert {"POST /v2/models/{model}/infer", "fermion.route", "fermion.queue"} <= names
    assert tracing.current_tracer() is None


def test_the_child_ends_with_a_gateway_that_died_without_its_shutdown() -> None:
    # A process that starts the exporter, sends it a span for a collector that never
    # answers (the child is then busy posting), and dies without a shutdown.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(1)
        url = f"http://127.0.0.1:{hole.getsockname()[1]}/v1/traces"
        script = (
            "import os, sys\n"
            "from serving.observability.export_process import ProcessSpanProcessor\n"
            "from tests.helpers.otlp_collector import finished_spans\n"
            f"p = ProcessSpanProcessor('otlp-http', {url!r}, {{}}, 'gone', batch=1, max_queue=64)\n"
            "p.on_end(finished_spans(1)[0])\n"
            "assert p.force_flush(10_000)\n"
            "print(p.child_pid, flush=True)\n"
            "os._exit(0)\n"
        )
        # (Its stdout: the child inherits it, so read the line, not the end.)
        with subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
        ) as gateway:
            assert gateway.stdout is not None
            child = int(gateway.stdout.readline())
            assert gateway.wait(timeout=60) == 0
        # Its post waits out a 10 s timeout; the child goes well before that.
        _wait(lambda: _gone(child), seconds=5)


def test_the_spans_the_export_process_could_not_take_are_a_metric(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "64")
    with socket.socket() as hole:  # a collector that never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(1)
        url = f"http://127.0.0.1:{hole.getsockname()[1]}/v1/traces"
        tracing.configure(TracingConfig(exporter="otlp-http", endpoint=url, export_process=True))
        tracer = tracing.current_tracer()
        assert tracer is not None
        assert _dropped_spans() == 0.0
        for _ in range(200):  # 20 MB: more than the pipe and the queue (64 spans) hold
            tracer.start_span("big", attributes={"fermion.payload": "x" * 100_000}).end()
        _wait(lambda: (_dropped_spans() or 0.0) > 0)
        tracing.shutdown()
    assert _dropped_spans() is None  # no export process, no family
