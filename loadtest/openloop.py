"""The open-loop engine: requests leave on a schedule, whatever the answers do.

Each request has an intended send time (from a rate plan or a capture's timestamps). Its
latency runs from that time, not from when it actually left: a server that stalls makes
the requests scheduled during the stall wait, and their wait is measured (a closed loop
would stop sending and hide it: coordinated omission). The engine also measures itself:
how late it dispatched each request (its lag) and the rate it really sent, so a
generator that cannot keep up says so instead of reporting a lower rate as the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Protocol

from loadtest.recorder import latency_bucket
from loadtest.transport import Call, Outcome, Transport

__all__ = [
    "LATE_MS",
    "EngineStats",
    "FailFast",
    "LatencySink",
    "Tick",
    "hist_percentile",
    "run_open_loop",
]

#: A request dispatched more than this after its intended time counts as late.
LATE_MS: Final = 10.0
#: Sleeps shorter than this are skipped: the request is sent at once.
_MIN_SLEEP_S: Final = 0.0005
#: Longer waits also watch for a stop (a replay's gaps may last minutes).
_LONG_SLEEP_S: Final = 0.05
#: Statuses that say the request itself is refused (not that the server is busy).
_REFUSALS: Final = frozenset({400, 401, 403, 404, 405, 411, 413, 415, 422})


def hist_percentile(hist: dict[int, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram of microsecond buckets, in milliseconds."""
    total = sum(hist.values())
    if not total:
        return None
    rank, seen = max(1, math.ceil(q * total)), 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return bucket / 1000.0
    return None


class LatencySink(Protocol):
    """Where outcomes go (a ``Recorder``, or one that splits warm-up from measurement)."""

    def record(self, end: float, ms: float, version: str | None, error: str | None) -> None:
        """One answer at ``end`` (epoch seconds), ``ms`` after its intended send time."""


def _add(into: dict[int, int], ms: float) -> None:
    b = latency_bucket(ms)
    into[b] = into.get(b, 0) + 1


@dataclass
class Tick:
    """One second of a run, for the live progress line (mergeable across workers)."""

    second: int
    sent: int = 0
    done: int = 0
    errors: int = 0
    in_flight: int = 0
    latency: dict[int, int] = field(default_factory=dict)

    def merge(self, other: Tick) -> None:
        """Add another worker's same second."""
        self.sent += other.sent
        self.done += other.done
        self.errors += other.errors
        self.in_flight += other.in_flight
        for b, n in other.latency.items():
            self.latency[b] = self.latency.get(b, 0) + n

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what a worker process prints)."""
        d = asdict(self)
        d["latency"] = {str(b): n for b, n in self.latency.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tick:
        """Read back ``to_dict()``."""
        return cls(
            second=int(d["second"]),
            sent=int(d["sent"]),
            done=int(d["done"]),
            errors=int(d["errors"]),
            in_flight=int(d["in_flight"]),
            latency={int(b): int(n) for b, n in d["latency"].items()},
        )


@dataclass
class EngineStats:
    """How the generator itself did: what it was to send, what it sent, how late."""

    scheduled: int = 0
    sent: int = 0
    completed: int = 0
    late: int = 0
    unsent: int = 0
    plan_s: float = 0.0
    last_send_s: float = 0.0
    last_lag_s: float = 0.0
    lag: dict[int, int] = field(default_factory=dict)
    aborted: str | None = None

    @property
    def achieved_rate(self) -> float:
        """Requests sent per second of schedule: lower than planned when sending stopped
        early or ended more than ``LATE_MS`` behind the schedule."""
        span = self.plan_s + max(self.last_lag_s - LATE_MS / 1000.0, 0.0)
        return self.sent / span if span > 0 else 0.0

    @property
    def target_rate(self) -> float:
        """Requests scheduled per second of the plan."""
        return self.scheduled / self.plan_s if self.plan_s > 0 else 0.0

    def merge(self, other: EngineStats) -> None:
        """Add another worker's figures (same plan, its own share)."""
        self.scheduled += other.scheduled
        self.sent += other.sent
        self.completed += other.completed
        self.late += other.late
        self.unsent += other.unsent
        self.plan_s = max(self.plan_s, other.plan_s)
        if other.last_send_s >= self.last_send_s:
            self.last_send_s, self.last_lag_s = other.last_send_s, other.last_lag_s
        for b, n in other.lag.items():
            self.lag[b] = self.lag.get(b, 0) + n
        self.aborted = self.aborted or other.aborted

    def to_dict(self) -> dict[str, Any]:
        """JSON form, with the derived figures the report shows."""
        return {
            "scheduled": self.scheduled,
            "sent": self.sent,
            "completed": self.completed,
            "late": self.late,
            "late_ms": LATE_MS,
            "unsent": self.unsent,
            "plan_s": self.plan_s,
            "last_send_s": self.last_send_s,
            "last_lag_s": self.last_lag_s,
            "target_rate": self.target_rate,
            "achieved_rate": self.achieved_rate,
            "lag_ms": {
                "p50": hist_percentile(self.lag, 0.5),
                "p99": hist_percentile(self.lag, 0.99),
                "max": hist_percentile(self.lag, 1.0),
            },
            "lag": {str(b): n for b, n in self.lag.items()},
            "aborted": self.aborted,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineStats:
        """Read back ``to_dict()``."""
        return cls(
            scheduled=int(d["scheduled"]),
            sent=int(d["sent"]),
            completed=int(d["completed"]),
            late=int(d["late"]),
            unsent=int(d["unsent"]),
            plan_s=float(d["plan_s"]),
            last_send_s=float(d["last_send_s"]),
            last_lag_s=float(d.get("last_lag_s", 0.0)),
            lag={int(b): int(n) for b, n in d["lag"].items()},
            aborted=d.get("aborted"),
        )


class FailFast:
    """Stops a run whose first answers all refuse the request itself (a 4xx other than
    429): a batch over the model's maximum fails the same way for the whole duration,
    so the run ends at once with the server's message. Once one request succeeds,
    failures are results to measure, never a reason to stop."""

    def __init__(self, after: int = 20) -> None:
        self._after = after
        self._refused = 0
        self._succeeded = False

    def __call__(self, outcome: Outcome) -> str | None:
        """The reason to stop after ``outcome``, or None to go on."""
        if self._succeeded:
            return None
        if outcome.ok:
            self._succeeded = True
            return None
        if outcome.status in _REFUSALS:
            self._refused += 1
            if self._refused >= self._after:
                return f"every answer so far refused the request: {outcome.error}"
        return None


async def run_open_loop(
    schedule: Iterable[tuple[float, Call]],
    transport: Transport,
    recorder: LatencySink,
    *,
    plan_s: float,
    timeout_s: float = 30.0,
    start_at: float | None = None,
    on_tick: Callable[[Tick], None] | None = None,
    should_abort: Callable[[Outcome], str | None] | None = None,
    stop: asyncio.Event | None = None,
) -> EngineStats:
    """Send every call of ``schedule`` (``(seconds from the start, call)``, in order) at
    its time and record each outcome in ``recorder`` with its latency from that time.

    ``start_at`` is the wall-clock start (workers of one run share it; default: now).
    ``plan_s`` is the schedule's length. A request unanswered ``timeout_s`` after its
    intended time fails as a timeout. ``on_tick`` gets each second's figures;
    ``should_abort`` may stop the run after an outcome (its reason is kept); setting
    ``stop`` ends sending early. Either way the engine waits for the requests in flight.
    """
    loop = asyncio.get_running_loop()
    wall_now, loop_now = time.time(), loop.time()
    start_wall = start_at if start_at is not None else wall_now
    start = loop_now + (start_wall - wall_now)
    stats = EngineStats(plan_s=plan_s)
    in_flight: set[asyncio.Task[None]] = set()
    halt = stop or asyncio.Event()
    tick = Tick(second=0)

    def finish(due: float, outcome: Outcome) -> None:
        now = loop.time()
        ms = (now - due) * 1000.0
        recorder.record(start_wall + (now - start), ms, outcome.version, outcome.error)
        stats.completed += 1
        tick.done += 1
        _add(tick.latency, ms)
        if not outcome.ok:
            tick.errors += 1
        if should_abort is not None and stats.aborted is None:
            reason = should_abort(outcome)
            if reason is not None:
                stats.aborted = reason
                halt.set()

    async def one(due: float, call: Call) -> None:
        # A timer may wake a little early: latency then runs from the real send time.
        due = min(due, loop.time())
        try:
            async with asyncio.timeout_at(due + timeout_s):
                outcome = await transport.send(call)
        except TimeoutError:
            outcome = Outcome(0, error=f"0 timeout: no answer within {timeout_s:g}s")
        finish(due, outcome)

    async def ticker() -> None:
        nonlocal tick
        while True:
            await asyncio.sleep(max(start + tick.second + 1 - loop.time(), 0.0))
            done, tick = tick, Tick(second=tick.second + 1)
            done.in_flight = len(in_flight)
            if on_tick is not None:
                on_tick(done)

    ticking = asyncio.create_task(ticker())
    try:
        for offset, call in schedule:
            stats.scheduled += 1
            if halt.is_set():
                stats.unsent += 1
                continue
            due = start + offset
            wait = due - loop.time()
            if wait > _LONG_SLEEP_S:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(halt.wait(), wait)
            elif wait > _MIN_SLEEP_S:
                await asyncio.sleep(wait)
            if wait > _MIN_SLEEP_S and halt.is_set():
                stats.unsent += 1
                continue
            now = loop.time()
            lag_ms = max(now - due, 0.0) * 1000.0
            _add(stats.lag, lag_ms)
            if lag_ms > LATE_MS:
                stats.late += 1
            stats.sent += 1
            stats.last_send_s = now - start
            stats.last_lag_s = lag_ms / 1000.0
            tick.sent += 1
            task = asyncio.create_task(one(due, call))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        while in_flight:
            await asyncio.wait(set(in_flight))
    finally:
        for task in in_flight:
            task.cancel()
        ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticking
        if on_tick is not None and (tick.sent or tick.done):
            tick.in_flight = 0
            on_tick(tick)
    return stats
