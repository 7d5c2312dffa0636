"""Prometheus metrics per model and version (the HTTP layer serves them at ``GET /metrics``).

Counters and histograms are plain Python numbers updated on the event loop (no
locks, no label lookups per request: each version's metrics are one object) and
turned into Prometheus families only when scraped. Queue depth is read from the
batchers at scrape time.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from serving.errors import (
    DeadlineExceeded,
    FermionError,
    InvalidInput,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
)

__all__ = ["ArtifactSource", "DepthSource", "GatewayMetrics", "VersionMetrics"]

T = TypeVar("T")

#: Yields (model, version, requests waiting) for every served version.
DepthSource = Callable[[], Iterable[tuple[str, int, int]]]
#: Yields (model, version, artifact target, device) for every loaded version.
ArtifactSource = Callable[[], Iterable[tuple[str, int, str, str]]]

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROWS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
_DIVERGENCE = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
#: Errors that refuse a request before it is computed, by reason label.
_REASONS: dict[type[FermionError], str] = {
    InvalidInput: "invalid",
    PayloadTooLarge: "too_large",
    Overloaded: "queue_full",
    ModelNotReady: "not_ready",
    DeadlineExceeded: "deadline",
}


class _Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class VersionMetrics:
    """The metrics of one model version; also its batcher's ``BatchObserver``."""

    __slots__ = (
        "batch_rows",
        "compute",
        "failed_batches",
        "latency",
        "model",
        "ok",
        "queue",
        "statuses",
        "version",
    )

    def __init__(self, model: str, version: str) -> None:
        self.model = model
        self.version = version
        #: Requests answered 200 (kept apart from ``statuses`` to stay a plain increment).
        self.ok = 0
        #: Other statuses -> requests.
        self.statuses: dict[str, int] = {}
        self.latency = _Histogram(_SECONDS)
        self.queue = _Histogram(_SECONDS)
        self.compute = _Histogram(_SECONDS)
        self.batch_rows = _Histogram(_ROWS)
        self.failed_batches = 0

    def observe_queue(self, seconds: float) -> None:
        """One request waited ``seconds`` for its batch."""
        self.queue.observe(seconds)

    def observe_batch(self, rows: int, seconds: float, ok: bool) -> None:
        """One batch of ``rows`` rows took ``seconds`` to compute."""
        self.compute.observe(seconds)
        self.batch_rows.observe(rows)
        if not ok:
            self.failed_batches += 1

    def count(self, status: str) -> None:
        """One request answered with an error ``status``."""
        self.statuses[status] = self.statuses.get(status, 0) + 1


def _histogram(
    name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], _Histogram]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, h in rows:
        family.add_metric(values, h.buckets(), h.total)
    return family


class GatewayMetrics:
    """Every metric of one gateway, with its own Prometheus registry."""

    def __init__(
        self, depth: DepthSource | None = None, artifacts: ArtifactSource | None = None
    ) -> None:
        self._depth = depth
        self._artifacts = artifacts
        self._versions: dict[tuple[str, int], VersionMetrics] = {}
        self._rejected: dict[tuple[str, str], int] = {}
        self._inflight: dict[str, int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def version(self, model: str, version: int) -> VersionMetrics:
        """The metrics of one model version (created on first use)."""
        vm = self._versions.get((model, version))
        if vm is None:
            vm = self._versions[(model, version)] = VersionMetrics(model, str(version))
        return vm

    async def track(
        self, call: Awaitable[T], model: str, state: dict[str, Any], started_ns: int
    ) -> T:
        """Await one inference ``call`` on ``model``, begun at ``started_ns``, and count it.

        The route leaves the (model, version) it served in ``state["served"]``.
        """
        inflight = self._inflight
        inflight[model] = inflight.get(model, 0) + 1
        try:
            result = await call
        except FermionError as e:
            served = state.get("served")
            if served is not None:
                self.version(*served).count(str(e.status_code))
            reason = _REASONS.get(type(e))
            if reason is not None and served is not None:
                self.reject(served[0], reason)
            raise
        except Exception:
            served = state.get("served")
            if served is not None:
                self.version(*served).count("500")
            raise
        finally:
            left = inflight[model] - 1
            if left:
                inflight[model] = left
            else:  # no entries left behind for names that were never served
                del inflight[model]
        vm = self.version(*state["served"])
        vm.ok += 1
        vm.latency.observe((time.perf_counter_ns() - started_ns) / 1e9)
        return result

    def reject(self, model: str, reason: str) -> None:
        """Count a request refused before it was computed (``model`` "" when unknown)."""
        key = (model, reason)
        self._rejected[key] = self._rejected.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        """Prometheus families of every metric (the registry calls this on scrape)."""
        mv = ["model", "version"]
        versions = sorted(self._versions.values(), key=lambda v: (v.model, v.version))
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
            if v.ok:
                requests.add_metric([v.model, v.version, "200"], v.ok)
            for status, count in sorted(v.statuses.items()):
                requests.add_metric([v.model, v.version, status], count)
            failed.add_metric([v.model, v.version], v.failed_batches)
        for model in sorted({v.model for v in versions}):
            inflight.add_metric([model], self._inflight.get(model, 0))
        yield requests
        yield inflight
        yield failed
        for name, doc, attr in (
            ("fermion_request_duration_seconds", "Inference request latency.", "latency"),
            ("fermion_queue_duration_seconds", "Time requests waited for a batch.", "queue"),
            ("fermion_compute_duration_seconds", "Time to compute one batch.", "compute"),
            ("fermion_batch_size", "Rows per computed batch.", "batch_rows"),
        ):
            rows = [([v.model, v.version], getattr(v, attr)) for v in versions]
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
        for (model, reason), count in sorted(self._rejected.items()):
            rejected.add_metric([model, reason], count)
        yield rejected

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric.

        The gateway's own families, then the ``fermion_*`` families that other
        modules (routing, shadow, rollouts) keep in prometheus_client's default
        registry.
        """
        return generate_latest(self.registry) + generate_latest(_DEFAULT_FERMION)


class _FermionFamilies:
    """The ``fermion_*`` families of prometheus_client's default registry."""

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if family.name.startswith("fermion_"):
                yield family


_DEFAULT_FERMION = _FermionFamilies()
