"""Prometheus metrics per model and version (the HTTP layer serves them at ``GET /metrics``).

The families are built at scrape time from the version counters (see counters.py),
the batchers' queue depth, and the collectors other layers register (routing,
shadow and rollout families): one registry exports every family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from serving.observability.counters import Histogram, VersionCounter, VersionCounters

__all__ = ["ArtifactSource", "Collector", "DepthSource", "GatewayMetrics"]

#: Yields (model, version, requests waiting) for every served version.
DepthSource = Callable[[], Iterable[tuple[str, int, int]]]
#: Yields (model, version, artifact target, device) for every loaded version.
ArtifactSource = Callable[[], Iterable[tuple[str, int, str, str]]]


class Collector(Protocol):
    """Yields Prometheus families when scraped."""

    def collect(self) -> Iterable[Metric]:
        """The families, as of now."""


def _histogram(
    name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], Histogram]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, h in rows:
        family.add_metric(values, h.buckets(), h.total)
    return family


class GatewayMetrics:
    """Every metric of one gateway, in its own Prometheus registry."""

    def __init__(
        self,
        counters: VersionCounters | None = None,
        depth: DepthSource | None = None,
        artifacts: ArtifactSource | None = None,
    ) -> None:
        self.counters = counters if counters is not None else VersionCounters()
        self._depth = depth
        self._artifacts = artifacts
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def version(self, model: str, version: int) -> VersionCounter:
        """The counter of one model version (created on first use)."""
        return self.counters.version(model, version)

    def reject(self, model: str, reason: str) -> None:
        """Count a request refused before it was computed (``model`` "" when unknown)."""
        self.counters.refuse(model, reason)

    def register(self, collector: Collector) -> None:
        """Export ``collector``'s families too (names must not clash with others)."""
        self.registry.register(collector)

    def collect(self) -> Iterator[Metric]:
        """Prometheus families of every metric (the registry calls this on scrape)."""
        mv = ["model", "version"]
        versions = self.counters.all()
        requests = CounterMetricFamily(
            "fermion_requests", "Inference requests by status code.", labels=[*mv, "status"]
        )
        inflight = GaugeMetricFamily(
            "fermion_inflight_requests", "Inference requests being handled now.", labels=["model"]
        )
        failed = CounterMetricFamily(
            "fermion_failed_batches", "Batches whose computation failed.", labels=mv
        )
        for v in versions:
            labels = [v.model, str(v.version)]
            if v.ok:
                requests.add_metric([*labels, "200"], v.ok)
            for status, count in sorted(v.statuses.items()):
                requests.add_metric([*labels, status], count)
            failed.add_metric(labels, v.failed_batches)
        for model in sorted({v.model for v in versions}):
            inflight.add_metric([model], self.counters.inflight.get(model, 0))
        yield requests
        yield inflight
        yield failed
        for name, doc, attr in (
            ("fermion_request_duration_seconds", "Inference request latency.", "latency"),
            ("fermion_queue_duration_seconds", "Time requests waited for a batch.", "queue_hist"),
            ("fermion_compute_duration_seconds", "Time to compute one batch.", "compute_hist"),
            ("fermion_batch_size", "Rows per computed batch.", "batch_rows"),
        ):
            rows = [([v.model, str(v.version)], getattr(v, attr)) for v in versions]
            yield _histogram(name, doc, mv, rows)
        depth = GaugeMetricFamily("fermion_queue_depth", "Requests waiting for a batch.", labels=mv)
        for model, version, waiting in self._depth() if self._depth is not None else ():
            depth.add_metric([model, str(version)], waiting)
        yield depth
        chosen = GaugeMetricFamily(
            "fermion_model_artifact",
            "The artifact each loaded version runs on this host (always 1).",
            labels=[*mv, "target", "device"],
        )
        for model, version, target, device in self._artifacts() if self._artifacts else ():
            chosen.add_metric([model, str(version), target, device], 1)
        yield chosen
        rejected = CounterMetricFamily(
            "fermion_rejected_requests",
            "Requests refused before computation, by reason.",
            labels=["model", "reason"],
        )
        refused = dict(self.counters.refused)
        for v in versions:
            for reason, count in v.refused.items():
                refused[(v.model, reason)] = refused.get((v.model, reason), 0) + count
        for (model, reason), count in sorted(refused.items()):
            rejected.add_metric([model, reason], count)
        yield rejected

    def render(self) -> bytes:
        """The Prometheus text exposition of every family."""
        return generate_latest(self.registry)
