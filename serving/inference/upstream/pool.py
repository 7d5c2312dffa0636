"""The upstreams of one remote version: which get traffic, and which are kept out.

Each upstream is watched two ways. Actively: every ``interval_s`` a probe (server
and model ready, and the metadata when it comes back) marks it healthy or not.
Passively: batches that get no answer count against it, and after
``failures_to_open`` in a row its circuit opens: no traffic for ``open_s``, then
one trial batch (half-open) that closes the circuit or opens it again for twice
as long. An upstream that comes back healthy starts with its circuit closed.
Batches go to the usable upstream with the fewest in flight, in turn on ties.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from serving.config import UpstreamHealthConfig
from serving.inference.upstream.client import UpstreamClient
from serving.observability.counters import Histogram

__all__ = ["Circuit", "Probe", "Upstream", "UpstreamPool"]

log = logging.getLogger("fermion.upstream")

#: Upper bounds (seconds) of the upstream latency histogram.
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Circuit(StrEnum):
    """An upstream's circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(eq=False)
class Upstream:
    """One upstream server of one remote version, and what is known of it."""

    url: str
    client: UpstreamClient
    #: The last active check passed.
    healthy: bool = False
    #: Why it is not healthy (empty when it is).
    reason: str = "not checked yet"
    circuit: Circuit = Circuit.CLOSED
    #: Batches in a row that got no answer.
    failures: int = 0
    open_until: float = 0.0
    open_for: float = 0.0
    in_flight: int = 0
    #: Times it was taken out of traffic (circuit opened, or an active check failed).
    ejections: int = 0
    #: Seconds from sending a batch to its answer (answers of any status).
    latency: Histogram = field(default_factory=lambda: Histogram(_SECONDS))
    #: Batches by outcome: ok, error (an error answer), unavailable (no answer).
    outcomes: dict[str, int] = field(default_factory=dict)

    @property
    def up(self) -> bool:
        """Healthy with its circuit closed: it gets traffic."""
        return self.healthy and self.circuit is Circuit.CLOSED

    def count(self, outcome: str) -> None:
        """One more batch with this outcome."""
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


#: Checks one upstream: None when it is ready to serve, else why not. ``back`` is
#: True when it is not healthy now (the probe then checks the metadata as well).
Probe = Callable[[Upstream, bool], Awaitable[str | None]]


class UpstreamPool:
    """Upstreams of one version: picking, passive and active health, circuit breakers."""

    def __init__(
        self, upstreams: list[Upstream], health: UpstreamHealthConfig, probe: Probe, name: str
    ) -> None:
        self.upstreams = upstreams
        self._health = health
        self._probe = probe
        self._name = name
        self._turn = 0
        self._task: asyncio.Task[None] | None = None
        for u in upstreams:
            u.open_for = health.open_s

    def _usable(self, u: Upstream, now: float) -> bool:
        if not u.healthy:
            return False
        if u.circuit is Circuit.OPEN:
            return now >= u.open_until  # time for one trial
        return u.circuit is Circuit.CLOSED

    @property
    def up(self) -> bool:
        """True when some upstream would take a batch now."""
        now = time.monotonic()
        return any(self._usable(u, now) for u in self.upstreams)

    def pick(self, exclude: Iterable[Upstream] = ()) -> Upstream | None:
        """The upstream for the next batch (fewest in flight, in turn), or None."""
        now = time.monotonic()
        skip = set(exclude)
        n = len(self.upstreams)
        best: Upstream | None = None
        for i in range(n):
            u = self.upstreams[(self._turn + i) % n]
            if u in skip or not self._usable(u, now):
                continue
            if best is None or u.in_flight < best.in_flight:
                best = u
        if best is None:
            return None
        self._turn = (self.upstreams.index(best) + 1) % n
        if best.circuit is Circuit.OPEN:
            best.circuit = Circuit.HALF_OPEN
            log.info("upstream %s of %s: circuit half-open, one trial batch", best.url, self._name)
        return best

    def answered(self, u: Upstream, seconds: float, *, ok: bool) -> None:
        """``u`` answered a batch (an error answer too: it is up and computing)."""
        u.latency.observe(seconds)
        u.count("ok" if ok else "error")
        u.failures = 0
        if u.circuit is not Circuit.CLOSED:
            log.info("upstream %s of %s: circuit closed", u.url, self._name)
            u.circuit = Circuit.CLOSED
            u.open_for = self._health.open_s

    def no_answer(self, u: Upstream, reason: str) -> None:
        """A batch sent to ``u`` got no answer."""
        u.count("unavailable")
        u.failures += 1
        h = self._health
        if u.circuit is Circuit.HALF_OPEN:
            u.open_for = min(u.open_for * 2, h.max_open_s)
            self._open(u, reason)
        elif u.circuit is Circuit.CLOSED and u.failures >= h.failures_to_open:
            u.open_for = h.open_s
            self._open(u, reason)

    def _open(self, u: Upstream, reason: str) -> None:
        u.circuit = Circuit.OPEN
        u.open_until = time.monotonic() + u.open_for
        u.ejections += 1
        log.warning(
            "upstream %s of %s: circuit open for %.1fs after %d batch(es) without answer (%s)",
            u.url,
            self._name,
            u.open_for,
            u.failures,
            reason,
        )

    async def check(self) -> None:
        """One round of active checks, every upstream at once."""
        await asyncio.gather(*(self._check(u) for u in self.upstreams))

    async def _check(self, u: Upstream) -> None:
        try:
            reason = await asyncio.wait_for(self._probe(u, not u.healthy), self._health.timeout_s)
        except TimeoutError:
            reason = f"no answer to the health check within {self._health.timeout_s:g}s"
        except Exception as e:  # a probe must never stop the checks
            reason = str(e) or type(e).__name__
        if reason is None:
            if not u.healthy:
                log.info("upstream %s of %s is ready", u.url, self._name)
                u.circuit, u.failures, u.open_for = Circuit.CLOSED, 0, self._health.open_s
            u.healthy, u.reason = True, ""
        else:
            if u.healthy:
                u.ejections += 1
                log.warning("upstream %s of %s is not ready: %s", u.url, self._name, reason)
            u.healthy, u.reason = False, reason

    def start(self) -> None:
        """Check every ``interval_s`` until ``stop``."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._health.interval_s)
            await self.check()

    async def stop(self) -> None:
        """Stop checking and close every upstream's connections."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for u in self.upstreams:
            await u.client.close()
