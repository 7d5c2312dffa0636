"""One host's figures from several workers' own: counters add, gauges by what they mean."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.observability.counters import VersionCounters
from serving.observability.host import merge_prometheus, merge_stats
from serving.observability.metrics import GatewayMetrics


def _worker(ok: int, inflight: int) -> bytes:
    counters = VersionCounters()
    version = counters.version("clf", 1)
    for _ in range(ok):
        version.answered(0)
    for _ in range(inflight):
        counters.enter("clf")
    return GatewayMetrics(counters).render()


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text.decode())
        for s in f.samples
    }


def test_counters_histograms_and_summed_gauges_add_up() -> None:
    merged = _samples(merge_prometheus([_worker(3, 1), _worker(4, 2)]))
    labels = (("model", "clf"), ("status", "200"), ("version", "1"))
    assert merged[("fermion_requests_total", labels)] == 7
    count = (
        "fermion_request_duration_seconds_count",
        (("model", "clf"), ("status_class", "2xx"), ("version", "1")),
    )
    assert merged[count] == 7
    assert merged[("fermion_inflight_requests", (("model", "clf"),))] == 3


def test_other_gauges_take_the_largest_and_start_times_the_earliest() -> None:
    def one(step: float, start: float, ready: float) -> bytes:
        registry = CollectorRegistry()
        Gauge("fermion_rollout_step_percent", "step", registry=registry).set(step)
        Gauge("process_start_time_seconds", "start", registry=registry).set(start)
        Gauge("fermion_ready", "ready", registry=registry).set(ready)
        return generate_latest(registry)

    merged = _samples(merge_prometheus([one(25, 100.0, 1.0), one(25, 90.0, 0.0)]))
    assert merged[("fermion_rollout_step_percent", ())] == 25
    assert merged[("process_start_time_seconds", ())] == 90.0
    # The host is ready only while every worker is.
    assert merged[("fermion_ready", ())] == 0.0


def test_statistics_rows_add_up_by_model_version_and_batch_size() -> None:
    a = {
        "model_stats": [
            {
                "name": "clf",
                "version": "1",
                "last_inference": 5,
                "inference_count": 2,
                "inference_stats": {"success": {"count": 2, "ns": 10}},
                "batch_stats": [{"batch_size": 1, "compute_infer": {"count": 2, "ns": 4}}],
            }
        ]
    }
    b = {
        "model_stats": [
            {
                "name": "clf",
                "version": "1",
                "last_inference": 9,
                "inference_count": 3,
                "inference_stats": {"success": {"count": 3, "ns": 20}},
                "batch_stats": [
                    {"batch_size": 1, "compute_infer": {"count": 1, "ns": 1}},
                    {"batch_size": 2, "compute_infer": {"count": 1, "ns": 3}},
                ],
            }
        ]
    }
    (row,) = merge_stats([a, b])["model_stats"]
    assert row["inference_count"] == 5 and row["last_inference"] == 9
    assert row["inference_stats"]["success"] == {"count": 5, "ns": 30}
    sizes = {r["batch_size"]: r["compute_infer"]["count"] for r in row["batch_stats"]}
    assert sizes == {1: 3, 2: 1}
