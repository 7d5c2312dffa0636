"""What the gateway counts about each model version, kept once.

One ``VersionCounter`` per (model, version) receives every request's outcome (from
the inference service) and every batch's timings (from the batcher). The Triton
statistics, the Prometheus families and the canary windows all read the same
object; nothing else counts requests. Plain numbers updated on the event loop.
"""

from __future__ import annotations

import random
import time
from array import array
from bisect import bisect_left
from contextvars import ContextVar
from dataclasses import dataclass

from serving import errors
from serving.errors import FermionError

__all__ = [
    "LATENCY_SAMPLES",
    "NO_MODEL",
    "REQUEST_STARTED_NS",
    "STATUS_CLASSES",
    "UNKNOWN_MODEL",
    "Duration",
    "Histogram",
    "VersionCounter",
    "VersionCounters",
    "reason_status",
]

#: Latencies kept between two canary reads; above it, a uniform reservoir sample.
LATENCY_SAMPLES = 20_000

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROWS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
#: The model label of a request that names a model this gateway never served.
UNKNOWN_MODEL = "_unknown"
#: The model label of a request that names no model (e.g. a body too large off the infer path).
NO_MODEL = ""
#: The status classes of the duration histogram.
STATUS_CLASSES = ("2xx", "4xx", "5xx")
#: ``time.perf_counter_ns()`` when the gateway took the current request (set by the
#: outermost HTTP layer), so that a refusal at the door is timed from the start too.
REQUEST_STARTED_NS: ContextVar[int | None] = ContextVar("fermion_request_started", default=None)

#: Refusal reason -> HTTP status, from the error types (each reason is one type's).
_REASON_STATUS: dict[str, int] = {
    cls.reason: cls.status_code
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, FermionError) and cls.reason is not None
}


def reason_status(reason: str) -> int:
    """The HTTP status of a refusal for ``reason`` (400 for a reason no error type has)."""
    return _REASON_STATUS.get(reason, 400)


def _status_class(status: int) -> str:
    return "2xx" if status < 400 else "4xx" if status < 500 else "5xx"


@dataclass
class Duration:
    """A count of events and their total nanoseconds (Triton's duration statistic)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, n: int = 1) -> None:
        """``n`` more events that took ``ns`` together."""
        self.count += n
        self.ns += ns


class Histogram:
    """Counts per bucket and the sum of the observed values."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """One more value."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts by upper bound, as Prometheus writes them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class VersionCounter:
    """Every count of one model version: request outcomes, queue and batch timings."""

    __slots__ = (
        "_latencies",
        "_seen",
        "batch_rows",
        "batch_sizes",
        "compute",
        "compute_hist",
        "durations",
        "execution_count",
        "expired",
        "fail",
        "failed_batches",
        "inference_count",
        "last_inference_ms",
        "model",
        "ok",
        "queue",
        "queue_hist",
        "refused",
        "rejected",
        "statuses",
        "success",
        "version",
    )

    def __init__(self, model: str, version: int) -> None:
        self.model = model
        self.version = version
        # Request outcomes, one record per request (``answered`` or ``failed``).
        #: Requests answered 200 (kept apart from ``statuses`` to stay a plain increment).
        self.ok = 0
        #: Other statuses -> requests.
        self.statuses: dict[str, int] = {}
        #: Requests refused before computation, by reason (a breakdown of ``statuses``).
        self.refused: dict[str, int] = {}
        #: Latency of every answered request, start to answer, by status class.
        self.durations = {c: Histogram(_SECONDS) for c in STATUS_CLASSES}
        self._latencies = array("d")
        self._seen = 0
        # Batches and the requests in them (the batcher), in Triton's statistics' terms.
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute = Duration()
        #: Requests refused because the queue was full.
        self.rejected = 0
        #: Requests whose deadline passed while they waited (never computed).
        self.expired = 0
        #: rows per batch -> (batches, compute ns)
        self.batch_sizes: dict[int, Duration] = {}
        self.queue_hist = Histogram(_SECONDS)
        self.compute_hist = Histogram(_SECONDS)
        self.batch_rows = Histogram(_ROWS)
        self.failed_batches = 0

    # ----------------------------------------------------------------- requests

    @property
    def latency(self) -> Histogram:
        """Latency of the requests answered 200."""
        return self.durations["2xx"]

    def answered(self, started_ns: int) -> None:
        """One request begun at ``started_ns`` (``perf_counter_ns``) was answered."""
        self.ok += 1
        seconds = (time.perf_counter_ns() - started_ns) / 1e9
        self.durations["2xx"].observe(seconds)
        self._seen += 1
        if len(self._latencies) < LATENCY_SAMPLES:
            self._latencies.append(seconds * 1000.0)
        else:
            slot = random.randrange(self._seen)
            if slot < LATENCY_SAMPLES:
                self._latencies[slot] = seconds * 1000.0

    def failed(self, error: Exception, started_ns: int | None = None) -> None:
        """One request failed with ``error`` (any non-FermionError counts as a 500).

        Its status is counted, its refusal reason if it has one, and with ``started_ns``
        its duration.
        """
        if isinstance(error, FermionError):
            self.refuse(error.status_code, error.reason, started_ns)
        else:
            self.refuse(500, None, started_ns)

    def refuse(self, status: int, reason: str | None, started_ns: int | None = None) -> None:
        """One request answered ``status`` (refused for ``reason``, when given)."""
        key = str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if reason is not None:
            self.refused[reason] = self.refused.get(reason, 0) + 1
        if started_ns is not None:
            seconds = (time.perf_counter_ns() - started_ns) / 1e9
            self.durations[_status_class(status)].observe(seconds)

    @property
    def server_errors(self) -> int:
        """Requests that failed on the server's side (5xx)."""
        return sum(n for status, n in self.statuses.items() if int(status) >= 500)

    def take_latencies(self) -> tuple[float, ...]:
        """Latencies (ms) of the requests answered since the last call; starts afresh."""
        taken = tuple(self._latencies)
        self._latencies = array("d")
        self._seen = 0
        return taken

    # ----------------------------------------------------------------- batches

    def batch_done(self, enqueued_ns: list[int], started_ns: int, rows: int, *, ok: bool) -> None:
        """A batch of ``rows`` rows, of requests queued at ``enqueued_ns``, was computed."""
        now = time.perf_counter_ns()
        compute = now - started_ns
        done = self.success if ok else self.fail
        for queued in enqueued_ns:
            self.queue.add(started_ns - queued)
            done.add(now - queued)
            self.queue_hist.observe((started_ns - queued) / 1e9)
        self.compute_hist.observe(compute / 1e9)
        self.batch_rows.observe(rows)
        if not ok:
            self.failed_batches += 1
            return
        self.inference_count += rows
        self.execution_count += 1
        self.compute.add(compute)
        self.batch_sizes.setdefault(rows, Duration()).add(compute)
        self.last_inference_ms = int(time.time() * 1000)


class VersionCounters:
    """Every version's counter, requests in flight per model, and requests of no version.

    A request that never reached a version (refused at the door, unknown model or
    version) is counted on its model's *door* counter (version 0). Its model label is
    the model's name only when the gateway has served that model; any other name counts
    as ``UNKNOWN_MODEL``, so that no client can add label values.
    """

    def __init__(self) -> None:
        self._versions: dict[tuple[str, int], VersionCounter] = {}
        self._models: set[str] = set()
        self._doors: dict[str, VersionCounter] = {}
        #: Requests being handled now, by model (served models only).
        self.inflight: dict[str, int] = {}

    def version(self, model: str, version: int) -> VersionCounter:
        """The counter of one model version (created on first use, kept across reloads)."""
        counter = self._versions.get((model, version))
        if counter is None:
            counter = self._versions[(model, version)] = VersionCounter(model, version)
            self._models.add(model)
        return counter

    def all(self) -> list[VersionCounter]:
        """Every version's counter, by model and version."""
        return [self._versions[k] for k in sorted(self._versions)]

    def label(self, model: str) -> str:
        """The model label for a request naming ``model``: bounded by the models served."""
        return model if model in self._models or model == NO_MODEL else UNKNOWN_MODEL

    def door(self, model: str) -> VersionCounter:
        """The counter of ``model``'s requests that reached no version (by its label)."""
        label = self.label(model)
        counter = self._doors.get(label)
        if counter is None:
            counter = self._doors[label] = VersionCounter(label, 0)
        return counter

    def doors(self) -> list[VersionCounter]:
        """Every door counter, by model label."""
        return [self._doors[k] for k in sorted(self._doors)]

    def enter(self, model: str) -> None:
        """A request for ``model`` is being handled."""
        self.inflight[model] = self.inflight.get(model, 0) + 1

    def leave(self, model: str) -> None:
        """A request for ``model`` is done (no entry is left for names never served)."""
        left = self.inflight[model] - 1
        if left:
            self.inflight[model] = left
        else:
            del self.inflight[model]

    def refuse(self, model: str, reason: str) -> None:
        """Count a request refused at the door (auth, rate limit, size; ``model`` "": none).

        Timed from ``REQUEST_STARTED_NS`` when the transport set it.
        """
        self.door(model).refuse(reason_status(reason), reason, REQUEST_STARTED_NS.get())
