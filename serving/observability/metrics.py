"""Prometheus metrics per model and version (the HTTP layer serves them at ``GET /metrics``).

The families are built at scrape time from the version counters (see counters.py),
the batchers' queue depth, and the collectors other layers register (routing,
shadow and rollout families): one registry exports every family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
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

__all__ = [
    "ArtifactSource",
    "Collector",
    "DepthSource",
    "GatewayMetrics",
    "ReadySource",
    "ReplicaSource",
]

#: Yields (model, version, requests waiting, queue capacity) for every served version.
DepthSource = Callable[[], Iterable[tuple[str, int, int, int]]]
#: Yields (model, version, artifact target, device) for every loaded version.
ArtifactSource = Callable[[], Iterable[tuple[str, int, str, str]]]
#: Running replicas per loaded (model, version).
ReplicaSource = Callable[[], Mapping[tuple[str, int], int]]
#: Whether the gateway is ready, and (model, version, ready) for every served version.
ReadySource = Callable[[], tuple[bool, Iterable[tuple[str, int, bool]]]]


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
        replicas: ReplicaSource | None = None,
        ready: ReadySource | None = None,
    ) -> None:
        self.counters = counters if counters is not None else VersionCounters()
        self._depth = depth
        self._artifacts = artifacts
        self._replicas = replicas
        self._ready = ready
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
        capacity = GaugeMetricFamily(
            "fermion_queue_capacity",
            "Requests that may wait for a batch before new ones get 503 (max_queue_size).",
            labels=mv,
        )
        for model, version, waiting, size in self._depth() if self._depth is not None else ():
            depth.add_metric([model, str(version)], waiting)
            capacity.add_metric([model, str(version)], size)
        yield depth
        yield capacity
        if self._ready is not None:
            gateway_ready, versions_ready = self._ready()
            yield GaugeMetricFamily(
                "fermion_ready",
                "1 while GET /v2/health/ready answers 200, else 0.",
                value=1 if gateway_ready else 0,
            )
            version_ready = GaugeMetricFamily(
                "fermion_version_ready", "1 while the version is READY, else 0.", labels=mv
            )
            for model, version, ok in versions_ready:
                version_ready.add_metric([model, str(version)], 1 if ok else 0)
            yield version_ready
        chosen = GaugeMetricFamily(
            "fermion_model_artifact",
            "The artifact each loaded version runs on this host (always 1).",
            labels=[*mv, "target", "device"],
        )
        for model, version, target, device in self._artifacts() if self._artifacts else ():
            chosen.add_metric([model, str(version), target, device], 1)
        yield chosen
        replicas = GaugeMetricFamily(
            "fermion_replicas",
            "Running replicas of each loaded version (backend ray: counted every few seconds).",
            labels=mv,
        )
        counts = self._replicas() if self._replicas is not None else {}
        for (model, version), n in sorted(counts.items()):
            replicas.add_metric([model, str(version)], n)
        yield replicas

    def render(self) -> bytes:
        """The Prometheus text exposition of every family."""
        return generate_latest(self.registry)
