"""Shadow traffic on real models in process: divergence figures, isolation, shedding."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from serving.config import RouteConfig
from serving.inference.repository import ModelRepository
from serving.observability.metrics import GatewayMetrics
from serving.traffic.route_table import RouteTable
from serving.traffic.shadow import ShadowMirror, compare_outputs
from tests.helpers.ab_models import (
    DELTA,
    FAIL_AT,
    MODEL,
    expected_logits,
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
    # The gauge is per mirror (this test's router): its agreement since it started.
    assert _sample(metrics, "fermion_shadow_top1_agreement", labels) == pytest.approx(
        want_agree / len(xs)
    )


async def test_a_failing_shadow_never_changes_the_answer(repository: ModelRepository) -> None:
    router = _router(repository, {"version": 3, "percent": 100})
    x = np.ones((4, 4), np.float32)
    x[:, 0] = FAIL_AT + 1  # version 3 fails on these rows
    for _ in range(5):
        out = await _send(router, repository, x)
        np.testing.assert_allclose(out["logits"], expected_logits(1, x), rtol=1e-5, atol=1e-6)
        await _drain(router.shadow)
    total = router.shadow.window(MODEL, 1, 3).total
    assert (total.mirrored, total.errors, total.rows) == (5, 5, 0)
    assert router.window(MODEL, 1).take().errors == 0


async def test_a_slow_shadow_does_not_delay_the_client_and_is_shed(
    repository: ModelRepository,
) -> None:
    router = _router(repository, {"version": 4, "percent": 100, "max_queue_depth": 2})
    x = np.ones((2, 4), np.float32)
    x[:, 3] = 300.0  # version 4 spins about a second per batch on these
    latencies = []
    for _ in range(30):
        started = time.perf_counter()
        out = await _send(router, repository, x)
        latencies.append(time.perf_counter() - started)
        np.testing.assert_allclose(out["logits"], expected_logits(1, x), rtol=1e-5, atol=1e-6)
    # The shadow takes ~1 s per batch; the client never waits for it (bound: 250 ms).
    assert max(latencies) < 0.25, latencies
    total = router.shadow.window(MODEL, 1, 4).total
    assert total.shed >= 25, total  # one running + two queued at most; the rest shed
    assert router.shadow.in_flight <= 3
    started = time.perf_counter()
    await router.shadow.stop()
    assert router.shadow.in_flight == 0
    assert time.perf_counter() - started < 0.5  # queued copies are dropped, not computed


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
