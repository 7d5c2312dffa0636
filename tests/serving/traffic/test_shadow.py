"""Shadow traffic on real models in process: divergence figures, isolation, shedding."""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext

from model_store.store import ModelStore
from serving.config import RouteConfig, ShadowConfig
from serving.inference.batcher import DynamicBatcher
from serving.inference.repository import ModelRepository
from serving.observability import tracing
from serving.observability.metrics import GatewayMetrics
from serving.traffic.route_table import RouteTable
from serving.traffic.shadow import ShadowMirror, compare_outputs
from serving.traffic.windows import ShadowFigures
from tests.helpers.ab_models import (
    DELTA,
    FAIL_AT,
    MODEL,
    expected_logits,
    serve_in_process,
)
from tests.serving.traffic.infer_calls import infer, service


def _router(repo: ModelRepository, shadow: dict[str, object]) -> RouteTable:
    config = RouteConfig.model_validate({"split": {1: 100}, "shadow": shadow})
    return RouteTable({MODEL: config}, repo)


async def _send(router: RouteTable, repo: ModelRepository, x: np.ndarray) -> dict[str, np.ndarray]:
    return await infer(service(router, repo), x)


async def _drain(mirror: ShadowMirror, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while mirror.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert mirror.in_flight == 0


def test_compare_outputs_of_a_known_pair() -> None:
    a = {"p": np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]], np.float32)}
    b = {"p": np.array([[0.1, 0.5, 0.6], [0.7, 0.1, 0.1]], np.float32)}
    figures = compare_outputs(a, b)
    assert figures.rows == 2 and figures.top1_rows == 2 and figures.agree_rows == 1
    assert figures.max_abs_diff == pytest.approx(0.6, abs=1e-6)
    assert compare_outputs(a, {"p": b["p"][:1]}).max_abs_diff == math.inf
    same = compare_outputs(a, a)
    assert same.max_abs_diff == 0.0 and same.top1_agreement == 1.0


def _metrics(router: RouteTable) -> GatewayMetrics:
    """The gateway's registry, exporting this router's shadow families."""
    metrics = GatewayMetrics()
    metrics.register(router.shadow)
    return metrics


def _sample(metrics: GatewayMetrics, metric: str, labels: dict[str, str]) -> float:
    return metrics.registry.get_sample_value(metric, labels) or 0.0


async def test_divergence_metrics_of_a_known_pair_of_models(repository: ModelRepository) -> None:
    router = _router(repository, {"version": 2, "percent": 100})
    metrics = _metrics(router)
    labels = {"model": MODEL, "primary": "1", "shadow": "2"}
    agree_before = _sample(metrics, "fermion_shadow_rows_total", labels | {"agree": "true"})
    differ_before = _sample(metrics, "fermion_shadow_rows_total", labels | {"agree": "false"})
    count_before = _sample(metrics, "fermion_shadow_max_abs_diff_count", labels)
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(8, 4)).astype(np.float32) for _ in range(12)]
    for x in batches:
        out = await _send(router, repository, x)
        np.testing.assert_allclose(out["logits"], expected_logits(1, x), rtol=1e-5, atol=1e-6)
        await _drain(router.shadow)  # one at a time: nothing is shed
    total = router.shadow.window(MODEL, 1, 2).total
    xs = np.concatenate(batches)
    want_diff = float(np.max(np.abs(expected_logits(2, xs) - expected_logits(1, xs))))
    want_agree = int(np.sum(expected_logits(2, xs).argmax(1) == expected_logits(1, xs).argmax(1)))
    assert float(np.max(np.abs(xs @ DELTA))) == pytest.approx(want_diff, abs=1e-5)
    assert total.mirrored == len(batches) and total.errors == 0 and total.shed == 0
    assert total.max_abs_diff == pytest.approx(want_diff, abs=1e-5)
    assert total.top1_rows == len(xs) and total.agree_rows == want_agree
    assert 0 < want_agree < len(xs)  # the pair really disagrees on some rows
    # The same figures reach Prometheus.
    agree = _sample(metrics, "fermion_shadow_rows_total", labels | {"agree": "true"}) - agree_before
    differ = (
        _sample(metrics, "fermion_shadow_rows_total", labels | {"agree": "false"}) - differ_before
    )
    assert (agree, differ) == (want_agree, len(xs) - want_agree)
    assert _sample(metrics, "fermion_shadow_max_abs_diff_count", labels) - count_before == len(
        batches
    )
    requests = "fermion_shadow_requests_total"
    assert _sample(metrics, requests, labels | {"outcome": "ok"}) == len(batches)
    assert metrics.registry.get_sample_value(requests, labels | {"outcome": "error"}) is None
    # The gauge is per mirror (this test's router): its agreement since it started.
    assert _sample(metrics, "fermion_shadow_top1_agreement", labels) == pytest.approx(
        want_agree / len(xs)
    )


async def test_a_failing_shadow_never_changes_the_answer(
    repository: ModelRepository, caplog: pytest.LogCaptureFixture
) -> None:
    router = _router(repository, {"version": 3, "percent": 100})
    metrics = _metrics(router)
    x = np.ones((4, 4), np.float32)
    x[:, 0] = FAIL_AT + 1  # version 3 fails on these rows
    with caplog.at_level(logging.DEBUG, logger="fermion.shadow"):
        for _ in range(5):
            out = await _send(router, repository, x)
            np.testing.assert_allclose(out["logits"], expected_logits(1, x), rtol=1e-5, atol=1e-6)
            await _drain(router.shadow)
    total = router.shadow.window(MODEL, 1, 3).total
    assert (total.mirrored, total.errors, total.rows) == (5, 5, 0)
    assert router.window(MODEL, 1).take().errors == 0
    # Each failure is logged (at debug: the client never saw it) and counted as an error.
    failures = [r.getMessage() for r in caplog.records if r.name == "fermion.shadow"]
    assert len(failures) == 5, failures
    assert all(m.startswith(f"shadow {MODEL} version 3 failed: ") for m in failures), failures
    assert all("inference failed" in m for m in failures), failures  # and why
    labels = {"model": MODEL, "primary": "1", "shadow": "3"}
    requests = "fermion_shadow_requests_total"
    assert _sample(metrics, requests, labels | {"outcome": "error"}) == 5
    assert metrics.registry.get_sample_value(requests, labels | {"outcome": "ok"}) is None


def _slow_rows(rows: int = 2) -> np.ndarray:
    x = np.ones((rows, 4), np.float32)
    x[:, 3] = 300.0  # version 4 spins for these (a few tenths of a second per batch here)
    return x


async def _fill_queue(batcher: object, depth: int, rows: int = 2) -> list[asyncio.Task[object]]:
    """Keep ``batcher`` busy with slow batches and ``depth`` requests waiting behind them."""
    assert isinstance(batcher, DynamicBatcher)  # a local version: no placement
    x = _slow_rows(rows)
    tasks: list[asyncio.Task[object]] = []
    for _ in range(100):
        if batcher.running == batcher.max_concurrent_batches and batcher.queue_depth == depth:
            return tasks
        tasks.append(asyncio.create_task(batcher.submit({"x": x}, rows)))
        await asyncio.sleep(0)
        failed = [t for t in tasks if t.done() and t.exception() is not None]
        assert not failed, failed[0].exception()
    raise AssertionError(f"queue not {depth} deep: {batcher.queue_depth}")


def _mirror_once(
    mirror: ShadowMirror, repo: ModelRepository, primary: int, shadow: dict[str, int]
) -> bool:
    """Offer ``mirror`` one answered request of ``primary``, as the inference service does."""
    x = np.ones((1, 4), np.float32)
    config = ShadowConfig.model_validate(shadow)
    served, _ = repo.resolve(MODEL, str(primary))
    return mirror.mirror(MODEL, config, served, {"x": x}, 1, {"logits": expected_logits(1, x)})


async def test_no_copy_is_made_while_the_primary_queue_is_full(
    repository: ModelRepository,
) -> None:
    # Version 4 is the primary here, kept busy; version 2, the shadow, is idle.
    _, primary = repository.resolve(MODEL, "4")
    mirror = ShadowMirror(repository)
    shadow = {"version": 2, "max_queue_depth": 2}
    waiting = await _fill_queue(primary, 1)
    assert _mirror_once(mirror, repository, 4, shadow)  # one waiting: below the bound
    waiting += await _fill_queue(primary, 2)
    assert not _mirror_once(mirror, repository, 4, shadow)  # two waiting: at the bound
    assert not _mirror_once(mirror, repository, 4, shadow | {"max_queue_depth": 1})
    assert _mirror_once(mirror, repository, 4, shadow | {"max_queue_depth": 3})
    await asyncio.gather(*waiting)
    await _drain(mirror)
    assert _mirror_once(mirror, repository, 4, shadow)  # the primary caught up
    await _drain(mirror)
    total = mirror.window(MODEL, 4, 2).total
    assert (total.mirrored, total.shed, total.errors) == (3, 2, 0)


async def test_no_copy_is_made_while_the_shadow_queue_is_full(
    repository: ModelRepository,
) -> None:
    _, shadow_batcher = repository.resolve(MODEL, "4")
    mirror = ShadowMirror(repository)
    shadow = {"version": 4, "max_queue_depth": 3}
    waiting = await _fill_queue(shadow_batcher, 2)
    assert _mirror_once(mirror, repository, 1, shadow)  # two waiting: below the bound
    await asyncio.sleep(0)  # the copy joins the shadow's queue
    assert shadow_batcher.queue_depth == 3
    assert not _mirror_once(mirror, repository, 1, shadow)  # three waiting: at the bound
    await mirror.stop()  # the queued copy is dropped
    assert shadow_batcher.queue_depth == 2
    await asyncio.gather(*waiting)
    total = mirror.window(MODEL, 1, 4).total
    assert (total.mirrored, total.shed) == (0, 1)


async def test_copies_in_flight_are_bounded(repository: ModelRepository) -> None:
    mirror = ShadowMirror(repository)
    # The queues are empty and stay so while these run (no await between them): only
    # the bound on copies in flight refuses the third and later ones.
    shadow = {"version": 2, "max_in_flight": 2, "max_queue_depth": 1000}
    made = [_mirror_once(mirror, repository, 1, shadow) for _ in range(5)]
    assert made == [True, True, False, False, False]
    assert mirror.in_flight == 2
    await _drain(mirror)
    assert _mirror_once(mirror, repository, 1, shadow)  # room again once they are done
    await _drain(mirror)
    total = mirror.window(MODEL, 1, 2).total
    assert (total.mirrored, total.shed, total.errors) == (3, 3, 0)


async def test_a_slow_shadow_does_not_delay_the_client_and_is_shed(
    repository: ModelRepository,
) -> None:
    x = _slow_rows()
    _, shadow_batcher = repository.resolve(MODEL, "4")
    # The baseline, from this run: one batch of the shadow computed alone.
    started = time.perf_counter()
    await shadow_batcher.submit({"x": x}, 2)
    shadow_batch_s = time.perf_counter() - started
    router = _router(repository, {"version": 4, "percent": 100, "max_queue_depth": 2})
    latencies, depths, in_flight = [], [], []
    for _ in range(30):
        started = time.perf_counter()
        out = await _send(router, repository, x)
        latencies.append(time.perf_counter() - started)
        depths.append(shadow_batcher.queue_depth)
        in_flight.append(router.shadow.in_flight)
        np.testing.assert_allclose(out["logits"], expected_logits(1, x), rtol=1e-5, atol=1e-6)
    # The client never waits for the shadow: no answer took as long as one shadow batch,
    # most took a small part of it.
    assert max(latencies) < shadow_batch_s, (latencies, shadow_batch_s)
    assert statistics.median(latencies) < shadow_batch_s / 10, (latencies, shadow_batch_s)
    # Copies wait two deep at most behind the one running; the others are shed.
    assert max(depths) <= 2 and max(in_flight) <= 3, (depths, in_flight)
    total = router.shadow.window(MODEL, 1, 4).total
    assert total.shed > 0 and total.shed + total.mirrored + router.shadow.in_flight == 30
    shed = {"model": MODEL, "primary": "1", "shadow": "4", "outcome": "shed"}
    assert _sample(_metrics(router), "fermion_shadow_requests_total", shed) == total.shed
    queued_rows = shadow_batcher.queue_depth * len(x)
    running_rows = router.shadow.in_flight * len(x) - queued_rows
    computed = shadow_batcher.stats.inference_count
    started = time.perf_counter()
    await router.shadow.stop()
    stop_s = time.perf_counter() - started
    assert router.shadow.in_flight == 0 and shadow_batcher.queue_depth == 0
    assert stop_s < shadow_batch_s  # stopping waits for no copy, running or queued
    while shadow_batcher.running:
        await asyncio.sleep(0.01)
    # Queued copies were dropped, not computed: only the batch running at the stop ran on.
    assert shadow_batcher.stats.inference_count - computed <= running_rows


async def test_percent_of_requests_mirrored(repository: ModelRepository) -> None:
    router = _router(repository, {"version": 2, "percent": 25, "max_queue_depth": 1000})
    x = np.ones((1, 4), np.float32)
    n = 800
    for _ in range(n):
        await _send(router, repository, x)
    await _drain(router.shadow)
    mirrored = router.shadow.window(MODEL, 1, 2).total.mirrored
    assert abs(mirrored - 0.25 * n) < 4.5 * math.sqrt(n * 0.25 * 0.75), mirrored


async def test_routed_requests_are_counted_per_version(repository: ModelRepository) -> None:
    router = RouteTable({MODEL: RouteConfig.model_validate({"split": {1: 50, 3: 50}})}, repository)
    bad = np.full((1, 4), FAIL_AT + 1, np.float32)
    outcomes: dict[str, int] = {}
    for _ in range(60):
        try:
            await _send(router, repository, bad)
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except Exception as e:
            assert getattr(e, "status_code", None) == 500
            outcomes["error"] = outcomes.get("error", 0) + 1
    v1, v3 = router.window(MODEL, 1).take(), router.window(MODEL, 3).take()
    assert (v1.requests, v1.errors) == (outcomes["ok"], 0)
    assert (v3.requests, v3.errors) == (outcomes["error"], outcomes["error"])
    assert v1.p99_ms is not None and v3.p99_ms is None


async def test_no_copy_at_zero_percent(repository: ModelRepository) -> None:
    mirror = ShadowMirror(repository)
    assert not _mirror_once(mirror, repository, 1, {"version": 2, "percent": 0})
    assert mirror.in_flight == 0
    assert mirror.window(MODEL, 1, 2).total == ShadowFigures()  # not even counted as shed


async def test_a_copy_is_a_span_of_the_sampled_request_it_mirrors(
    repository: ModelRepository, exporter: InMemorySpanExporter
) -> None:
    tracer = tracing.current_tracer()
    assert tracer is not None
    mirror = ShadowMirror(repository)
    with tracer.start_as_current_span("request") as request:
        assert _mirror_once(mirror, repository, 1, {"version": 2})
    await _drain(mirror)
    # Sampled out: the copy makes no span of its own.
    unsampled = SpanContext(request.get_span_context().trace_id, 0x5EED, is_remote=False)
    with trace.use_span(NonRecordingSpan(unsampled)):
        assert _mirror_once(mirror, repository, 1, {"version": 2})
    await _drain(mirror)
    assert mirror.window(MODEL, 1, 2).total.mirrored == 2
    shadows = [s for s in exporter.get_finished_spans() if s.name == "fermion.shadow"]
    assert len(shadows) == 1, [s.name for s in exporter.get_finished_spans()]
    [span] = shadows
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id
    assert dict(span.attributes or {}) == {
        "fermion.model": MODEL,
        "fermion.version": "1",
        "fermion.shadow_version": "2",
        "fermion.rows": 1,
    }


async def test_copies_wait_behind_client_requests_at_the_lowest_priority(
    ab_store: ModelStore,
) -> None:
    # Clients without a priority go first (level 1 of 2); one row per batch.
    batching = {"max_batch_size": 1, "priority_levels": 2, "default_priority_level": 1}
    async with serve_in_process(ab_store, batching=batching) as repository:
        _, shadow_batcher = repository.resolve(MODEL, "4")
        mirror = ShadowMirror(repository)
        busy = await _fill_queue(shadow_batcher, 0, rows=1)  # a slow batch runs
        assert _mirror_once(mirror, repository, 1, {"version": 4})
        await asyncio.sleep(0)  # the copy waits, queued first
        assert shadow_batcher.queue_depth == 1
        client = await shadow_batcher.submit({"x": np.ones((1, 4), np.float32)}, 1)
        # The client, queued after the copy, was computed before it.
        assert client["logits"].shape == (1, 3)
        assert mirror.window(MODEL, 1, 4).total.mirrored == 0 and mirror.in_flight == 1
        await asyncio.gather(*busy)
        await _drain(mirror)
        assert mirror.window(MODEL, 1, 4).total.mirrored == 1
