"""Traces: an incoming traceparent continues through route, queue, batch and executor spans;
a batch links every request in it; OTLP/HTTP export reaches a receiver on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from model_store.store import ModelStore
from serving.config import FermionConfig, ServerConfig, TracingConfig
from serving.http.middleware.access_log import ACCESS_LOGGER
from serving.inference.batcher import DynamicBatcher
from serving.observability import tracing
from tests.helpers.inprocess import digits_body, serve_in_process
from tests.helpers.otlp_collector import otlp_collector, otlp_grpc_collector, service_names
from tests.helpers.spies import spy

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture(autouse=True)
def _tracing_off_after() -> Iterator[None]:
    yield
    tracing.shutdown()


def _by_name(spans: tuple[ReadableSpan, ...] | list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_traceparent_flows_through_gateway_batch_and_executor(
    demo_store: ModelStore,
) -> None:
    exporter = InMemorySpanExporter()
    async with serve_in_process(FermionConfig(), demo_store, span_exporter=exporter) as gw:
        r = await gw.client.post(
            "/v2/models/digits/infer",
            json=digits_body(),
            headers={"traceparent": TRACEPARENT, "tracestate": "vendor=1", "x-request-id": "t1"},
        )
        assert r.status_code == 200
    spans = _by_name(
        [s for s in exporter.get_finished_spans() if s.context.trace_id == int(TRACE_ID, 16)]
    )
    server = spans["POST /v2/models/{model}/infer"]
    assert server.kind is trace.SpanKind.SERVER
    assert _parent_id(server) == int(PARENT_ID, 16)
    assert server.context.trace_state.get("vendor") == "1"
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["fermion.request_id"] == "t1"
    route, queue, batch, run = (
        spans[n] for n in ("fermion.route", "fermion.queue", "fermion.batch", "fermion.execute")
    )
    assert route.attributes is not None and route.attributes["fermion.model"] == "digits"
    assert route.attributes["fermion.version"] == "2"  # a string on every span, as in V2
    assert _parent_id(route) == server.context.span_id
    assert _parent_id(queue) == server.context.span_id
    assert _parent_id(batch) == server.context.span_id
    assert [link.context.span_id for link in batch.links] == [server.context.span_id]
    assert _parent_id(run) == batch.context.span_id
    assert batch.attributes is not None and batch.attributes["fermion.batch.rows"] == 1
    # Children end inside their parents.
    assert server.start_time is not None and server.end_time is not None
    assert run.end_time is not None and batch.end_time is not None
    assert server.start_time <= queue.start_time <= batch.start_time <= run.start_time  # type: ignore[operator]
    assert run.end_time <= batch.end_time <= server.end_time


async def test_batch_span_links_every_request_in_it() -> None:
    exporter = InMemorySpanExporter()
    provider = tracing.configure(TracingConfig(), exporter=exporter)
    assert provider is not None

    async def slow(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        await asyncio.sleep(0.02)
        return {"y": inputs["x"]}

    batcher = DynamicBatcher(slow, max_batch_size=8, model="m", version="1")
    request_tracer = provider.get_tracer("test")

    async def request(i: int) -> int:
        with request_tracer.start_as_current_span(f"request-{i}") as span:
            await batcher.submit({"x": np.zeros((1, 2), dtype=np.float32)}, 1)
            return span.get_span_context().span_id

    ids = await asyncio.gather(*(request(i) for i in range(6)))
    batches = [s for s in exporter.get_finished_spans() if s.name == "fermion.batch"]
    # The first request runs alone; the five that queued behind it share one batch.
    assert [len(b.links) for b in batches] == [1, 5]
    assert {link.context.span_id for b in batches for link in b.links} == set(ids)
    assert batches[1].attributes is not None and batches[1].attributes["fermion.batch.rows"] == 5


async def test_sampling_ratio_zero_keeps_only_sampled_parents(demo_store: ModelStore) -> None:
    exporter = InMemorySpanExporter()
    config = FermionConfig(tracing=TracingConfig(sample_ratio=0.0))
    async with serve_in_process(config, demo_store, span_exporter=exporter) as gw:
        await gw.client.get("/v2/models/digits")
        assert exporter.get_finished_spans() == ()
        await gw.client.get("/v2/models/digits", headers={"traceparent": TRACEPARENT})
        assert [s.name for s in exporter.get_finished_spans()] == ["GET /v2/models/{model}"]


@pytest.mark.parametrize(
    ("sampler", "outcomes"),
    [
        ("traceidratio", {True, False}),
        ("parentbased_traceidratio", {True, False}),
        ("always_on", {True}),
        ("parentbased_always_on", {True}),
        ("always_off", {False}),
        ("parentbased_always_off", {False}),
    ],
)
def test_a_root_is_sampled_before_its_span_as_the_sdk_would(
    sampler: str, outcomes: set[bool]
) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, TraceIdRatioBased

    exporter = InMemorySpanExporter()
    tracing.configure(
        TracingConfig(sampler=sampler, sample_ratio=0.5),  # type: ignore[arg-type]
        exporter=exporter,
    )
    tracer = tracing.current_tracer()
    assert tracer is not None
    # The SDK's rule for a root of this kind (a parentbased_ sampler defers to it).
    rule = {"traceidratio": TraceIdRatioBased(0.5), "always_on": ALWAYS_ON}.get(
        sampler.removeprefix("parentbased_"), ALWAYS_OFF
    )
    seen = set()
    with tracer.start_as_current_span("whatever is current"):  # never a root's parent
        for _ in range(200):
            trace_id, recorded = tracing.new_root()
            expected = rule.should_sample(None, trace_id, "x").decision.is_sampled()  # type: ignore[no-untyped-call]
            assert recorded is expected
            seen.add(recorded)
            span = tracing.start_server_span(
                tracer, "root", parent=None, root=trace_id, attributes={}
            )
            # Its span agrees: recorded (and exported), in that trace, a root.
            assert span.is_recording() is recorded
            assert span.get_span_context().trace_id == trace_id
            assert span.get_span_context().trace_flags.sampled is recorded
            exported = len(exporter.get_finished_spans())
            span.end()
            finished = exporter.get_finished_spans()
            assert len(finished) == exported + recorded
            if recorded:
                assert finished[-1].name == "root" and finished[-1].parent is None
                assert finished[-1].context.trace_id == trace_id
    assert seen == outcomes
    # Other roots get random ids again.
    other = tracer.start_span("other", context=trace.set_span_in_context(trace.INVALID_SPAN))
    assert other.get_span_context().trace_id not in (0, trace_id)


def test_no_tracer_no_sampled_root() -> None:
    tracing.shutdown()
    trace_id, recorded = tracing.new_root()
    assert trace_id != 0 and not recorded


async def test_sampled_out_requests_keep_their_trace_id_and_build_no_span(
    demo_store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    exporter = InMemorySpanExporter()
    config = FermionConfig(
        tracing=TracingConfig(sample_ratio=0.5), server=ServerConfig(access_log=True)
    )
    async with serve_in_process(config, demo_store, span_exporter=exporter) as gw:
        with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
            for _ in range(40):
                r = await gw.client.post("/v2/models/digits/infer", json=digits_body())
                assert r.status_code == 200
    logged = [
        json.loads(rec.getMessage())["trace_id"]
        for rec in caplog.records
        if rec.name == ACCESS_LOGGER
    ]
    assert len(logged) == 40 and all(len(t) == 32 and int(t, 16) for t in logged)
    rule = TraceIdRatioBased(0.5)
    sampled = {
        t
        for t in logged
        if rule.should_sample(None, int(t, 16), "x").decision.is_sampled()  # type: ignore[no-untyped-call]
    }
    spans = [s for s in exporter.get_finished_spans() if s.name != "GET /v2/health/ready"]
    servers = [s for s in spans if s.kind is trace.SpanKind.SERVER]
    assert {format(s.context.trace_id, "032x") for s in servers} == sampled
    assert len(servers) == len(sampled)
    assert 0 < len(sampled) < 40
    # Every span of an inference belongs to a sampled request: the others built none.
    assert {format(s.context.trace_id, "032x") for s in spans} == sampled
    # ... and a sampled request after sampled-out ones (one task serves them all here)
    # still has its children: a request's sampled-out mark never reaches another.
    for trace_id in sampled:
        names = {s.name for s in spans if format(s.context.trace_id, "032x") == trace_id}
        assert {"fermion.route", "fermion.queue", "fermion.batch"} <= names


def test_a_request_marked_sampled_out_asks_nothing_until_a_span_is_made_current(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracing.configure(TracingConfig(), exporter=InMemorySpanExporter())
    tracer = tracing.current_tracer()
    assert tracer is not None
    asked = spy(monkeypatch, trace, "get_current_span")
    assert tracing.recording_tracer() is None and len(asked) == 1  # asked: no mark yet
    token = tracing.mark_sampled_out()
    assert tracing.recording_tracer() is None
    assert tracing.inject_context() == {}
    assert len(asked) == 1  # the mark answered
    span = tracer.start_span("fermion.batch")  # a root, recorded (ratio 1)
    current = tracing.make_current(span)
    assert tracing.recording_tracer() is tracer  # a span made current ends the mark
    assert tracing.inject_context()["traceparent"].startswith("00-")
    tracing.detach(current)
    span.end()
    tracing.unmark_sampled_out(token)
    before = len(asked)
    assert tracing.recording_tracer() is None and len(asked) == before + 1  # asked again


async def test_otlp_http_export_to_a_loopback_receiver(demo_store: ModelStore) -> None:
    with otlp_collector() as collector:
        config = FermionConfig(
            tracing=TracingConfig(
                exporter="otlp-http",
                endpoint=collector.url,
                headers={"x-tenant": "blue"},
                service_name="fermion-test",
            )
        )
        async with serve_in_process(config, demo_store) as gw:
            r = await gw.client.post(
                "/v2/models/digits/infer", json=digits_body(), headers={"traceparent": TRACEPARENT}
            )
            assert r.status_code == 200
        # Leaving the app shut the tracer down, which flushed the batch processor.
    spans = [
        span
        for message in collector.received
        for resource_spans in message.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    ours = {s.name for s in spans if s.trace_id.hex() == TRACE_ID}
    assert {"POST /v2/models/{model}/infer", "fermion.route", "fermion.queue"} <= ours
    assert {"fermion.batch", "fermion.execute"} <= ours
    assert service_names(collector.received) == {"fermion-test"}
    assert {headers.get("x-tenant", "") for headers in collector.headers} == {"blue"}


async def test_shadow_call_is_a_span_of_its_request(demo_store: ModelStore) -> None:
    exporter = InMemorySpanExporter()
    config = FermionConfig.model_validate(
        {"routes": {"digits": {"split": {1: 100}, "shadow": {"version": 2, "percent": 100}}}}
    )
    async with serve_in_process(config, demo_store, span_exporter=exporter) as gw:
        r = await gw.client.post(
            "/v2/models/digits/infer", json=digits_body(), headers={"traceparent": TRACEPARENT}
        )
        assert r.status_code == 200
        assert r.headers["fermion-model-version"] == "1"
        for _ in range(200):  # the shadow runs after the client's answer
            if any(s.name == "fermion.shadow" for s in exporter.get_finished_spans()):
                break
            await asyncio.sleep(0.01)
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == int(TRACE_ID, 16)]
    server = _by_name(spans)["POST /v2/models/{model}/infer"]
    shadow = _by_name(spans)["fermion.shadow"]
    assert _parent_id(shadow) == server.context.span_id
    assert shadow.attributes is not None
    assert shadow.attributes["fermion.version"] == "1"
    assert shadow.attributes["fermion.shadow_version"] == "2"
    # The shadow's own batch runs inside the shadow span.
    batches = [s for s in spans if s.name == "fermion.batch"]
    assert any(_parent_id(b) == shadow.context.span_id for b in batches)


async def test_spans_follow_the_http_conventions_and_errors_look_alike(
    demo_store: ModelStore,
) -> None:
    """Bounded names, semantic-convention attributes, one way to record every error."""
    exporter = InMemorySpanExporter()
    async with serve_in_process(FermionConfig(), demo_store, span_exporter=exporter) as gw:
        bad = digits_body()
        bad["inputs"][0]["datatype"] = "INT8"
        sent = {
            "/v2/models/nosuch/infer": (digits_body(), 404),
            "/v2/models/digits/infer": (bad, 400),
            "/v2/models/digits/versions/1/infer": (digits_body(), 200),
        }
        for path, (body, status) in sent.items():
            r = await gw.client.post(path, json=body, headers={"user-agent": "probe/1.0"})
            assert r.status_code == status
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind is trace.SpanKind.SERVER and "health" not in s.name]
    assert [s.name for s in servers] == [
        "POST /v2/models/{model}/infer",
        "POST /v2/models/{model}/infer",
        "POST /v2/models/{model}/versions/{version}/infer",
    ]
    for span, (path, (_, status)) in zip(servers, sent.items(), strict=True):
        a = span.attributes
        assert a is not None
        assert a["url.path"] == path and a["http.request.method"] == "POST"
        assert a["http.route"] == span.name.removeprefix("POST ")
        assert a["url.scheme"] == "http" and a["server.address"] == "gateway"
        assert a["client.address"] == "127.0.0.1"
        assert a["user_agent.original"] == "probe/1.0"
        assert a["http.response.status_code"] == status
        assert a.get("error.type") == (str(status) if status >= 400 else None)
        assert span.status.status_code is trace.StatusCode.UNSET  # 4xx: the client's error
    # No stack trace for an answer: not on the 404's route span, nor anywhere else.
    assert all(not s.events for s in spans)
    versions = {
        type(s.attributes["fermion.version"])
        for s in spans
        if s.attributes is not None and "fermion.version" in s.attributes
    }
    assert versions == {str}


@pytest.mark.parametrize("env_size", [None, "16"])
async def test_spans_are_exported_in_small_batches(
    demo_store: ModelStore, monkeypatch: pytest.MonkeyPatch, env_size: str | None
) -> None:
    # A big batch is encoded with the GIL held for tens of ms: a stall of the event loop.
    if env_size is None:
        monkeypatch.delenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", raising=False)
    else:
        monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", env_size)
    limit = int(env_size) if env_size else tracing.EXPORT_BATCH
    with otlp_collector() as collector:
        config = FermionConfig(tracing=TracingConfig(exporter="otlp-http", endpoint=collector.url))
        async with serve_in_process(config, demo_store) as gw:
            for _ in range(30):  # about 6 spans each
                r = await gw.client.post("/v2/models/digits/infer", json=digits_body())
                assert r.status_code == 200
    sizes = [
        sum(len(ss.spans) for rs in m.resource_spans for ss in rs.scope_spans)
        for m in collector.received
    ]
    assert sum(sizes) >= 30 * 5
    assert max(sizes) <= limit
    assert max(sizes) == limit  # batches fill up to the limit, no further


def test_otel_environment_variables_fill_what_the_file_leaves_out() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=blue,authorization=Bearer%20t",
        "OTEL_SERVICE_NAME": "gateway-eu",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
    }
    r = tracing.resolve(TracingConfig(), env)
    assert (r.exporter, r.endpoint) == ("otlp-http", "http://collector:4318/v1/traces")
    assert r.headers == {"x-tenant": "blue", "authorization": "Bearer t"}
    assert (r.service_name, r.sampler, r.sample_ratio) == (
        "gateway-eu",
        env["OTEL_TRACES_SAMPLER"],
        0.25,
    )
    grpc = tracing.resolve(TracingConfig(), {**env, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert (grpc.exporter, grpc.endpoint) == ("otlp-grpc", "http://collector:4318/")
    traces_only = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom"}
    assert tracing.resolve(TracingConfig(), traces_only).endpoint == "http://c:4318/custom"
    # What the file says wins; an explicit "none" (or OTEL_SDK_DISABLED) keeps tracing off.
    filed = TracingConfig(exporter="console", service_name="from-file", sample_ratio=1.0)
    r = tracing.resolve(filed, env)
    assert (r.exporter, r.service_name, r.sample_ratio) == ("console", "from-file", 1.0)
    assert tracing.resolve(TracingConfig(exporter="none"), env).exporter == "none"
    assert tracing.resolve(TracingConfig(), {**env, "OTEL_SDK_DISABLED": "true"}).exporter == "none"
    assert (
        tracing.resolve(TracingConfig(), {"OTEL_TRACES_EXPORTER": "console"}).exporter == "console"
    )
    assert tracing.resolve(TracingConfig(), {}).exporter == "none"
    off = tracing.resolve(TracingConfig(), {"OTEL_TRACES_SAMPLER": "always_off"})
    assert off.sampler == "always_off"


async def test_otlp_grpc_export_configured_by_the_environment(
    demo_store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    with otlp_grpc_collector() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "fermion-grpc-test")
        async with serve_in_process(FermionConfig(), demo_store) as gw:
            r = await gw.client.post(
                "/v2/models/digits/infer", json=digits_body(), headers={"traceparent": TRACEPARENT}
            )
            assert r.status_code == 200
    names = {
        span.name
        for message in collector.received
        for rs in message.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
        if span.trace_id.hex() == TRACE_ID
    }
    assert {"POST /v2/models/{model}/infer", "fermion.batch", "fermion.execute"} <= names
    services = {
        attr.value.string_value
        for message in collector.received
        for rs in message.resource_spans
        for attr in rs.resource.attributes
        if attr.key == "service.name"
    }
    assert services == {"fermion-grpc-test"}


def test_a_collector_that_never_answers_holds_shutdown_up_at_most_a_second() -> None:
    # A listening socket that never accepts: every export waits for its timeout (10 s).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(1)
        port = blackhole.getsockname()[1]
        endpoint = f"http://127.0.0.1:{port}/v1/traces"
        provider = tracing.configure(TracingConfig(exporter="otlp-http", endpoint=endpoint))
        assert provider is not None
        tracer = tracing.current_tracer()
        assert tracer is not None
        for i in range(10):
            tracer.start_span(f"span-{i}").end()
        started = time.perf_counter()
        tracing.shutdown()
        waited = time.perf_counter() - started
    assert tracing.current_tracer() is None
    # Bounded by SHUTDOWN_WAIT_S (1 s), far below the exporter's own 10 s timeout.
    assert waited < tracing.SHUTDOWN_WAIT_S + 2.0, waited


def _dropped_spans() -> float | None:
    families = list(tracing.EXPORT_METRICS.collect())
    return families[0].samples[0].value if families else None


def test_spans_a_stuck_collector_cannot_take_are_counted_not_logged_one_by_one(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every request traced, the collector gone quiet: the queue fills, and every span
    # after it is dropped. A line per span would flood the log (thousands a second on
    # a busy gateway) and cost the event loop more than the span; it is counted instead.
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "128")
    with socket.socket() as hole:  # listening, never accepting
        hole.bind(("127.0.0.1", 0))
        hole.listen(1)
        endpoint = f"http://127.0.0.1:{hole.getsockname()[1]}/v1/traces"
        tracing.configure(TracingConfig(exporter="otlp-http", endpoint=endpoint))
        tracer = tracing.current_tracer()
        assert tracer is not None
        assert _dropped_spans() == 0.0
        with caplog.at_level(logging.INFO):
            for i in range(2000):
                tracer.start_span(f"span-{i}").end()
        dropped = _dropped_spans()
        # Held at most: the queue's 128 spans and the batch being exported (and a batch of slack).
        assert dropped is not None and 2000 - 128 - 2 * tracing.EXPORT_BATCH < dropped < 2000
        about_drops = [r for r in caplog.records if "drop" in r.getMessage().lower()]
        assert 1 <= len(about_drops) <= 2, [r.getMessage() for r in about_drops[:5]]
        tracing.shutdown()
    assert _dropped_spans() is None


def test_batches_the_collector_refused_are_counted_as_dropped() -> None:
    with otlp_collector(*[400] * 100) as collector:
        tracing.configure(TracingConfig(exporter="otlp-http", endpoint=collector.url))
        tracer = tracing.current_tracer()
        assert tracer is not None
        for i in range(tracing.EXPORT_BATCH * 2):
            tracer.start_span(f"span-{i}").end()
        deadline = time.monotonic() + 20
        while (_dropped_spans() or 0.0) < tracing.EXPORT_BATCH * 2:
            assert time.monotonic() < deadline, _dropped_spans()
            time.sleep(0.05)
        # Each batch was posted once: a 400 is not retried.
        assert len(collector.headers) == 2
