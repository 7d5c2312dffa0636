"""Arrival rates for open-loop tests: ``--rate 2000/s``, steps and ramps, and the send times
they give.

A plan is a list of segments, each a constant rate or a linear ramp between two rates::

    2000/s                    2000 requests/s for the whole test
    100/s,200/s,400/s         three steps, each a third of the test
    100/s..1000/s             a linear ramp over the whole test
    50/s:10s,50/s..500/s:20s  10 s at 50/s, then a 20 s ramp to 500/s

A rate is ``N/s``, ``N/m`` or a bare number (per second). Segments without a length share
what ``--duration`` leaves. Send times are where the cumulative expected count reaches
each request's index: evenly spaced (``uniform``) or a Poisson process (``poisson``).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from serving.durations import parse_duration

__all__ = ["ARRIVALS", "RatePlan", "Segment", "format_rate", "parse_rate", "parse_rate_value"]

#: How requests are spread in time: evenly, or as a Poisson process of the same rate.
ARRIVALS: Final = ("uniform", "poisson")

_UNITS: Final = {"s": 1.0, "m": 1 / 60.0, "h": 1 / 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([smh]))?\s*$")


def parse_rate_value(text: str) -> float:
    """Requests per second of ``"2000/s"``, ``"600/m"`` or ``"25"`` (ValueError if invalid)."""
    m = _RATE.match(text)
    if m is None:
        raise ValueError(f"invalid rate {text!r} (e.g. 2000/s, 600/m, 25)")
    return float(m[1]) * _UNITS[m[2] or "s"]


def format_rate(rate: float) -> str:
    """``rate`` (requests/s) for people: ``2000/s``, ``12.5/s``."""
    return f"{rate:.4g}/s" if rate < 1e4 else f"{rate:.0f}/s"


@dataclass(frozen=True)
class Segment:
    """A stretch of the test at a constant rate (``start == end``) or a linear ramp."""

    start_rate: float
    end_rate: float
    duration_s: float

    def expected(self, t: float) -> float:
        """Requests expected in the first ``t`` seconds of this segment."""
        return self.start_rate * t + (self.end_rate - self.start_rate) * t * t / (
            2 * self.duration_s
        )

    def time_of(self, count: float) -> float:
        """When the expected count reaches ``count`` (``count <= expected(duration)``)."""
        r0, slope = self.start_rate, (self.end_rate - self.start_rate) / self.duration_s
        if abs(slope) < 1e-12:
            return count / r0 if r0 > 0 else self.duration_s
        # slope/2 t^2 + r0 t - count = 0, the root in [0, duration]
        disc = max(r0 * r0 + 2 * slope * count, 0.0)
        return min(max((math.sqrt(disc) - r0) / slope, 0.0), self.duration_s)

    def describe(self) -> str:
        """``2000/s for 60s`` or ``100/s..1000/s over 30s``."""
        if self.start_rate == self.end_rate:
            return f"{format_rate(self.start_rate)} for {self.duration_s:g}s"
        return (
            f"{format_rate(self.start_rate)}..{format_rate(self.end_rate)} "
            f"over {self.duration_s:g}s"
        )


@dataclass(frozen=True)
class RatePlan:
    """The target arrival rate over a test: consecutive segments."""

    segments: tuple[Segment, ...]

    @property
    def duration_s(self) -> float:
        """The length of the plan."""
        return sum(s.duration_s for s in self.segments)

    @property
    def total(self) -> float:
        """Requests the plan sends in all."""
        return sum(s.expected(s.duration_s) for s in self.segments)

    @property
    def peak(self) -> float:
        """The highest rate of the plan."""
        return max(max(s.start_rate, s.end_rate) for s in self.segments)

    def rate_at(self, t: float) -> float:
        """The target rate ``t`` seconds into the test (0 after its end)."""
        for s in self.segments:
            if t < s.duration_s:
                return s.start_rate + (s.end_rate - s.start_rate) * t / s.duration_s
            t -= s.duration_s
        return 0.0

    def expected(self, t: float) -> float:
        """Requests the plan sends in its first ``t`` seconds."""
        done = 0.0
        for s in self.segments:
            if t < s.duration_s:
                return done + s.expected(max(t, 0.0))
            done += s.expected(s.duration_s)
            t -= s.duration_s
        return done

    def scaled(self, factor: float) -> RatePlan:
        """This plan with every rate multiplied by ``factor`` (a worker's share)."""
        return RatePlan(
            tuple(
                Segment(s.start_rate * factor, s.end_rate * factor, s.duration_s)
                for s in self.segments
            )
        )

    def send_times(
        self, arrival: str = "uniform", phase: float = 0.5, seed: int | None = None
    ) -> Iterator[float]:
        """Intended send times (seconds from the start), in order.

        ``uniform``: the k-th request at the time the expected count reaches ``k + phase``
        (``phase`` in [0, 1): N workers with phases i/N interleave evenly). ``poisson``:
        exponential gaps in the expected count (a Poisson process with the plan's rate).
        """
        if arrival not in ARRIVALS:
            raise ValueError(f"unknown arrival {arrival!r} (one of {', '.join(ARRIVALS)})")
        rng = random.Random(seed)
        offset, done = 0.0, 0.0
        count = phase if arrival == "uniform" else rng.expovariate(1.0)
        for s in self.segments:
            in_segment = s.expected(s.duration_s)
            while count < done + in_segment:
                yield offset + s.time_of(count - done)
                count += 1.0 if arrival == "uniform" else rng.expovariate(1.0)
            done += in_segment
            offset += s.duration_s

    def describe(self) -> str:
        """The plan in words: ``2000/s for 60s``, ``100/s for 10s, then 200/s for 10s``."""
        return ", then ".join(s.describe() for s in self.segments)


def _segment(text: str) -> tuple[float, float, float | None]:
    body, _, length = text.partition(":")
    duration = parse_duration(length) if length.strip() else None
    if duration is not None and duration <= 0:
        raise ValueError(f"invalid rate segment {text!r}: its length must be positive")
    lo, sep, hi = body.partition("..")
    r0 = parse_rate_value(lo)
    r1 = parse_rate_value(hi) if sep else r0
    # "100..1000/s": the unit written once, at the end, applies to both ends
    if sep and "/" not in lo and "/" in hi:
        r0 = parse_rate_value(lo + hi[hi.index("/") :])
    return r0, r1, duration


def parse_rate(text: str, duration_s: float | None = None) -> RatePlan:
    """The plan ``text`` describes (see the module's doc); ``duration_s`` is ``--duration``.

    Segments without a length share what ``duration_s`` leaves after those with one;
    ValueError names what is wrong.
    """
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ValueError(f"invalid rate {text!r} (e.g. 2000/s, 100/s,200/s or 100/s..1000/s)")
    parsed = [_segment(p) for p in parts]
    fixed = sum(d for _, _, d in parsed if d is not None)
    open_ = [p for p in parsed if p[2] is None]
    if open_:
        if duration_s is None or duration_s <= fixed:
            raise ValueError(
                f"rate {text!r}: segments without a length need a --duration longer than {fixed:g}s"
            )
        share = (duration_s - fixed) / len(open_)
    segments = tuple(Segment(r0, r1, d if d is not None else share) for r0, r1, d in parsed)
    if all(s.start_rate == 0 and s.end_rate == 0 for s in segments):
        raise ValueError(f"rate {text!r} sends nothing")
    return RatePlan(segments)
