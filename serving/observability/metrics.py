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
        """Count a request refused at the door (``model`` "" when it names none).

        A model this gateway never served counts as ``UNKNOWN_MODEL``.
        """
        self.counters.refuse(model, reason)

    def register(self, collector: Collector) -> None:
        """Export ``collector``'s families too (names must not clash with others)."""
        self.registry.register(collector)

    def collect(self) -> Iterator[Metric]:
        """Prometheus families of every metric (the registry calls this on scrape).

        Every inference request is counted once in ``fermion_requests`` (by status) and
        timed once in ``fermion_request_duration_seconds`` (by status class);
        ``fermion_rejected_requests`` breaks the refused ones down by reason. Requests
        that reached no version have ``version=""``.
        """
        mv = ["model", "version"]
        versions = self.counters.all()
        everything = [*versions, *self.counters.doors()]
        requests = CounterMetricFamily(
            "fermion_requests", "Inference requests by status code.", labels=[*mv, "status"]
        )
        durations = HistogramMetricFamily(
            "fermion_request_duration_seconds",
            "Inference request latency, from arrival to answer, by status class.",
            labels=[*mv, "status_class"],
        )
        rejected = CounterMetricFamily(
            "fermion_rejected_requests",
            "Requests refused before computation, by reason (part of fermion_requests).",
            labels=["model", "reason"],
        )
        refused: dict[tuple[str, str], int] = {}
        for v in everything:
            labels = [v.model, str(v.version) if v.version else ""]
            if v.ok:
                requests.add_metric([*labels, "200"], v.ok)
            for status, count in sorted(v.statuses.items()):
                requests.add_metric([*labels, status], count)
            for status_class, h in v.durations.items():
                if any(h.counts) or (status_class == "2xx" and v.version):
                    durations.add_metric([*labels, status_class], h.buckets(), h.total)
            for reason, count in v.refused.items():
                refused[(v.model, reason)] = refused.get((v.model, reason), 0) + count
        for (model, reason), count in sorted(refused.items()):
            rejected.add_metric([model, reason], count)
        yield requests
        yield durations
        yield rejected
        inflight = GaugeMetricFamily(
            "fermion_inflight_requests", "Inference requests being handled now.", labels=["model"]
        )
        for model in sorted({v.model for v in versions}):
            inflight.add_metric([model], self.counters.inflight.get(model, 0))
        yield inflight
        failed = CounterMetricFamily(
            "fermion_failed_batches", "Batches whose computation failed.", labels=mv
        )
        for v in versions:
            failed.add_metric([v.model, str(v.version)], v.failed_batches)
        yield failed
        for name, doc, attr in (
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

    def render(self) -> bytes:
        """The Prometheus text exposition of every family."""
        return generate_latest(self.registry)
