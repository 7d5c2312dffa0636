"""Figures of routed traffic, read and reset once per canary interval.

Per model version: requests, server-side errors and a sample of latencies, read
as deltas of the version's counter (the gateway counts each request once).
Per shadow pair (model, primary version, shadow version): mirrored requests, shadow
errors, shed copies, compared rows, top-1 agreement and the largest output difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from serving.observability.counters import Histogram, VersionCounter

__all__ = [
    "LatencyFigures",
    "ShadowFigures",
    "ShadowWindow",
    "VersionWindow",
    "latency_bucket",
    "latency_bucket_ms",
]

#: Fine latency buckets for figures merged across gateways: bucket ``i`` holds latencies
#: up to ``_LAT_BASE_MS * _LAT_FACTOR ** i`` (5% apart, 10 µs to hours in 300 buckets).
_LAT_BASE_MS = 0.01
_LAT_FACTOR = 1.05
_LAT_BUCKETS = 300


def latency_bucket(ms: float) -> int:
    """The fine bucket of a latency in milliseconds."""
    if ms <= _LAT_BASE_MS:
        return 0
    return min(_LAT_BUCKETS, math.ceil(math.log(ms / _LAT_BASE_MS, _LAT_FACTOR) - 1e-9))


def latency_bucket_ms(index: int) -> float:
    """The upper bound of a fine latency bucket, in milliseconds."""
    return _LAT_BASE_MS * _LAT_FACTOR**index


@dataclass(frozen=True)
class LatencyFigures:
    """Requests, errors and latencies of one version over a window."""

    requests: int = 0
    errors: int = 0
    latencies_ms: tuple[float, ...] = ()
    #: Latencies binned by ``latency_bucket`` (figures merged from several gateways).
    histogram: tuple[tuple[int, int], ...] = ()

    @property
    def error_rate(self) -> float:
        """Errors per request (0 with no request)."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p99_ms(self) -> float | None:
        """The 99th percentile latency of successful requests (None with none).

        Exact from samples; from a histogram, the upper bound of the bucket holding it.
        """
        if self.histogram:
            counts: dict[int, int] = {}
            for index, n in self.histogram:
                counts[index] = counts.get(index, 0) + n
            for ms in self.latencies_ms:
                index = latency_bucket(ms)
                counts[index] = counts.get(index, 0) + 1
            total = sum(counts.values())
            rank, seen = math.ceil(0.99 * total), 0
            for index in sorted(counts):
                seen += counts[index]
                if seen >= rank:
                    return latency_bucket_ms(index)
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def merge(self, other: LatencyFigures) -> LatencyFigures:
        """Both windows as one."""
        return LatencyFigures(
            self.requests + other.requests,
            self.errors + other.errors,
            self.latencies_ms + other.latencies_ms,
            self.histogram + other.histogram,
        )

    def summary(self) -> dict[str, float | int | None]:
        """The figures as JSON-ready numbers."""
        p99 = self.p99_ms
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "p99_ms": None if p99 is None else round(p99, 3),
        }


class VersionWindow:
    """One version's figures since the last ``take`` (or the counter's start)."""

    __slots__ = ("_counter", "_errors", "_requests")

    def __init__(self, counter: VersionCounter) -> None:
        self._counter = counter
        self._requests = self._errors = 0

    def take(self) -> LatencyFigures:
        """The figures since the last ``take`` (answered and 5xx requests); starts afresh."""
        c = self._counter
        errors = c.server_errors
        requests = c.ok + errors
        figures = LatencyFigures(
            requests - self._requests, errors - self._errors, c.take_latencies()
        )
        self._requests, self._errors = requests, errors
        return figures


@dataclass(frozen=True)
class ShadowFigures:
    """How a shadow version compared with the primary over a window."""

    mirrored: int = 0
    errors: int = 0
    shed: int = 0
    rows: int = 0
    #: Rows whose top-1 class agreed (classifier outputs only).
    agree_rows: int = 0
    #: Rows compared for top-1 agreement.
    top1_rows: int = 0
    max_abs_diff: float | None = None

    @property
    def top1_agreement(self) -> float | None:
        """Share of rows whose top-1 class agreed (None without classifier rows)."""
        return self.agree_rows / self.top1_rows if self.top1_rows else None

    @property
    def error_rate(self) -> float:
        """Shadow errors per mirrored request."""
        return self.errors / self.mirrored if self.mirrored else 0.0

    def merge(self, other: ShadowFigures) -> ShadowFigures:
        """Both windows as one."""
        diffs = [d for d in (self.max_abs_diff, other.max_abs_diff) if d is not None]
        return ShadowFigures(
            self.mirrored + other.mirrored,
            self.errors + other.errors,
            self.shed + other.shed,
            self.rows + other.rows,
            self.agree_rows + other.agree_rows,
            self.top1_rows + other.top1_rows,
            max(diffs) if diffs else None,
        )

    def summary(self) -> dict[str, float | int | None]:
        """The figures as JSON-ready numbers."""
        agreement = self.top1_agreement
        return {
            "mirrored": self.mirrored,
            "errors": self.errors,
            "shed": self.shed,
            "rows": self.rows,
            "top1_agreement": None if agreement is None else round(agreement, 6),
            "max_abs_diff": self.max_abs_diff,
        }


#: Buckets of the largest output difference per compared request.
_DIFF_BOUNDS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)


class ShadowWindow:
    """Accumulates one shadow pair's comparisons: since start, and since the last ``take``."""

    def __init__(self) -> None:
        self._total = ShadowFigures()
        self._window = ShadowFigures()
        #: The largest difference of each compared request, since start.
        self.diffs = Histogram(_DIFF_BOUNDS)

    def add(self, figures: ShadowFigures) -> None:
        """Count one mirrored, shed or failed request (as figures of its own)."""
        self._total = self._total.merge(figures)
        self._window = self._window.merge(figures)
        if figures.max_abs_diff is not None:
            self.diffs.observe(figures.max_abs_diff)

    @property
    def total(self) -> ShadowFigures:
        """Every comparison since the gateway started."""
        return self._total

    def take(self) -> ShadowFigures:
        """The figures since the last ``take``; the window starts afresh."""
        figures, self._window = self._window, ShadowFigures()
        return figures
