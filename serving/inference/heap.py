"""The gateway's heap and Python's cycle collector: kept off the latency tail.

CPython's cycle collector runs a young collection whenever the tracked objects
allocated, net of those freed, pass its first threshold (700), and a full one once
enough objects have survived into the oldest generation. A gateway at saturation
crosses 700 every few requests with nothing but the objects its requests hold in
flight; those survive a collection or two, reach the oldest generation, and soon
trigger a full collection, which walks every object the process holds: the ~60,000
of its imports, models and configuration, 30-50 ms with the event loop stopped,
about twice a second. Almost none of it is garbage: a request's objects are freed
by reference counting when it is answered.

``HeapPolicy`` removes both causes. ``settle`` freezes the heap (``gc.freeze``,
after a collection of what is already garbage) once the models are loaded and after
every load or unload, so collections never walk the long-lived objects again; and a
young threshold above what requests hold in flight (``server.gc_young_threshold``)
lets collections follow the cyclic garbage actually made, not the traffic. It also
times every collection for ``/metrics``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from serving.observability.counters import Histogram

__all__ = ["HeapPolicy"]

#: Pause buckets, in seconds: a young collection takes microseconds, a full one of a
#: frozen heap well under a millisecond, one of a whole unfrozen heap tens of ms.
_PAUSE_BOUNDS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class HeapPolicy:
    """How the gateway process uses the cycle collector (``server.gc_*`` keys).

    ``freeze``: ``settle`` freezes the heap. ``young_threshold``: the collector's first
    threshold while installed (None: Python's own). ``install`` applies it and starts
    timing collections; ``uninstall`` restores what was there before.
    """

    def __init__(self, *, freeze: bool = True, young_threshold: int | None = None) -> None:
        self.freeze = freeze
        self.young_threshold = young_threshold
        self._saved: tuple[int, int, int] | None = None
        self._started = 0.0
        self._pauses = [Histogram(_PAUSE_BOUNDS) for _ in range(3)]
        #: Objects freed by each generation's collections since ``install``.
        self.collected = [0, 0, 0]

    def install(self) -> None:
        """Apply the threshold and time every collection from now on."""
        if self._saved is not None:
            return
        self._saved = gc.get_threshold()
        if self.young_threshold is not None:
            gc.set_threshold(self.young_threshold, *self._saved[1:])
        gc.callbacks.append(self._on_collection)

    def uninstall(self) -> None:
        """Restore the threshold and stop timing collections (the heap stays frozen)."""
        if self._saved is None:
            return
        gc.set_threshold(*self._saved)
        self._saved = None
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def settle(self) -> None:
        """Collect what is garbage now, then freeze every object left (with ``freeze``).

        Called once the models are loaded and warmed up, and after each load or unload:
        what exists then is the gateway's long-lived state. Frozen objects are still
        freed by reference counting when nothing refers to them any more; only a cycle
        among them (a few dozen objects of an unloaded model version) stays.
        """
        if not self.freeze:
            return
        gc.collect()
        gc.freeze()

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        self._pauses[generation].observe(time.perf_counter() - self._started)
        self.collected[generation] += info["collected"]

    def pauses(self, generation: int) -> Histogram:
        """The pauses of ``generation``'s collections since ``install``."""
        return self._pauses[generation]

    def collect(self) -> Iterator[Metric]:
        """Prometheus families: collection pauses by generation, frozen objects."""
        pauses = HistogramMetricFamily(
            "fermion_gc_pause_seconds",
            "Event-loop pauses of Python's cycle collector, by generation (2: full).",
            labels=["generation"],
        )
        for generation, h in enumerate(self._pauses):
            pauses.add_metric([str(generation)], h.buckets(), h.total)
        yield pauses
        yield GaugeMetricFamily(
            "fermion_gc_frozen_objects",
            "Objects frozen out of the cycle collector's scans (gc.freeze).",
            value=gc.get_freeze_count(),
        )
