"""A version computed in two places: the gateway's own replica and upstream V2 servers.

Each place has its own batcher (its own batch size, queue and batches in flight);
a policy picks the place of each request when it arrives:

- ``local-first``: local, unless the request would wait there behind
  ``overflow_queue_depth`` others (or there is no local replica): then remote,
  when an upstream is up;
- ``remote-first``: remote while an upstream is up, else local;
- ``split``: ``remote_percent`` of requests remote (while an upstream is up).

A request its first place could not compute (not ready, no upstream answered, the
queue full) goes once to the other place, so an upstream dying under load costs
latency, not failed requests. Every answer says where it was computed.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from prometheus_client.metrics_core import CounterMetricFamily

from serving.config import RemoteSettings
from serving.errors import ModelNotReady, Overloaded
from serving.inference.batcher import DynamicBatcher
from serving.observability.counters import VersionCounter

__all__ = ["REMOTE", "PlacedBatcher", "location_family"]

log = logging.getLogger("fermion.placement")

#: The location of answers computed by an upstream.
REMOTE = "remote"


@dataclass(frozen=True, slots=True)
class _Place:
    batcher: DynamicBatcher
    location: str


class PlacedBatcher:
    """Sends each request of one version to its local replica or its upstreams."""

    def __init__(
        self,
        local: DynamicBatcher | None,
        remote: DynamicBatcher,
        settings: RemoteSettings,
        *,
        local_location: str,
        remote_up: Callable[[], bool],
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._local = _Place(local, local_location) if local is not None else None
        self._remote = _Place(remote, REMOTE)
        self.policy = settings.policy
        self._overflow = settings.overflow_queue_depth
        self._remote_share = settings.remote_percent / 100.0
        self._remote_up = remote_up
        self._draw = draw
        #: Answered requests by location.
        self.answers: dict[str, int] = {}
        main = local if local is not None else remote
        self.stats: VersionCounter = main.stats
        self.max_queue_delay_s = main.max_queue_delay_s
        self.max_queue_size = main.max_queue_size
        self.max_concurrent_batches = main.max_concurrent_batches
        self.priority_levels = main.priority_levels
        self.max_batch_size = min(b.max_batch_size for b in (local, remote) if b is not None)

    @property
    def queue_depth(self) -> int:
        """Requests waiting, in both places."""
        local = self._local.batcher.queue_depth if self._local is not None else 0
        return local + self._remote.batcher.queue_depth

    @property
    def closed(self) -> bool:
        """True once ``close`` began (the version is unloading)."""
        return self._remote.batcher.closed and (self._local is None or self._local.batcher.closed)

    @property
    def running(self) -> int:
        """Batches being computed now, in both places."""
        local = self._local.batcher.running if self._local is not None else 0
        return local + self._remote.batcher.running

    def _order(self) -> tuple[_Place, _Place | None]:
        """Where a request goes first, and where it may go if that place cannot take it."""
        local, remote = self._local, self._remote
        if local is None:
            return remote, None
        if self.policy == "remote-first":
            go_remote = self._remote_up()
        elif self.policy == "split":
            go_remote = self._draw() < self._remote_share and self._remote_up()
        else:  # local-first: remote when waiting here would make the queue deeper than the bound
            b = local.batcher
            waiting = b.queue_depth + (b.running >= b.max_concurrent_batches)
            go_remote = waiting > self._overflow and self._remote_up()
        return (remote, local) if go_remote else (local, remote)

    async def _compute(
        self, inputs: dict[str, np.ndarray], rows: int, deadline_ns: int | None, priority: int
    ) -> tuple[dict[str, np.ndarray], str]:
        first, other = self._order()
        try:
            outputs = await first.batcher.submit(
                inputs, rows, deadline_ns=deadline_ns, priority=priority
            )
            return outputs, first.location
        except (ModelNotReady, Overloaded) as e:
            if other is None or (deadline_ns is not None and time.perf_counter_ns() >= deadline_ns):
                raise
            if other is self._remote and not self._remote_up():
                raise
            log.debug(
                "%s did not compute a request (%s): %s will", first.location, e, other.location
            )
        outputs = await other.batcher.submit(
            inputs, rows, deadline_ns=deadline_ns, priority=priority
        )
        return outputs, other.location

    async def submit_located(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        *,
        deadline_ns: int | None = None,
        priority: int = 0,
    ) -> tuple[dict[str, np.ndarray], str]:
        """Answer one request: its outputs and the location that computed them (counted)."""
        outputs, location = await self._compute(inputs, rows, deadline_ns, priority)
        self.answers[location] = self.answers.get(location, 0) + 1
        return outputs, location

    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        *,
        deadline_ns: int | None = None,
        priority: int = 0,
    ) -> dict[str, np.ndarray]:
        """Compute one request (a shadow copy: not counted among the answers)."""
        outputs, _ = await self._compute(inputs, rows, deadline_ns, priority)
        return outputs

    async def close(self) -> None:
        """Finish every queued request in both places; take no new ones."""
        if self._local is not None:
            await self._local.batcher.close()
        await self._remote.batcher.close()


def location_family(rows: Iterable[tuple[str, int, str, int]]) -> CounterMetricFamily:
    """``fermion_answered_requests``: (model, version, location, answered requests) rows."""
    family = CounterMetricFamily(
        "fermion_answered_requests",
        "Requests answered, by where they were computed (local, ray, remote).",
        labels=["model", "version", "location"],
    )
    for model, version, location, count in rows:
        family.add_metric([model, str(version), location], count)
    return family
