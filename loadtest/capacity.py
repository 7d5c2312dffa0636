"""Capacity search: the highest sustained arrival rate that still meets the SLO.

Each probe is an open-loop run at one constant rate: a warm-up (not judged), then a
measured window judged against the objectives (latency percentiles from the intended
send times, the error share). The search doubles the rate from ``start`` until a probe
misses (or halves it until one meets), then bisects (geometric midpoints) until the
highest rate met and the lowest rate missed are within ``precision`` of each other. A
probe that has clearly missed stops early, and waits for its answers before the next
starts. A probe in which the generator itself could not send the rate ends the search:
the capacity is then only known to be at least the highest rate met.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from loadtest.open_runner import StopRule
from loadtest.rates import format_rate
from loadtest.slo import Slo
from loadtest.summary import PERCENTILES, number

__all__ = [
    "CapacityResult",
    "ProbeResult",
    "format_capacity",
    "generator_kept_up",
    "search",
    "stop_rule",
]

#: A probe is judged only if the generator sent at least this share of its rate...
MIN_SENT_SHARE: Final = 0.95
#: ...and at most this share of its requests left late (see ``openloop.LATE_MS``).
MAX_LATE_SHARE: Final = 0.01


@dataclass
class ProbeResult:
    """One rate tried: met (True), missed (False) or not judged (None: the generator
    could not send it), with what was measured."""

    rate: float
    ok: bool | None
    summary: dict[str, Any] = field(default_factory=dict)
    generator: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] | None = None
    slo: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON form (latency, errors, the generator's and the server's figures)."""
        s = self.summary
        return {
            "rate": self.rate,
            "ok": self.ok,
            "requests": s.get("requests", 0),
            "rps": s.get("rps", 0.0),
            "error_rate": s.get("error_rate", 0.0),
            "latency_ms": s.get("latency_ms", {}),
            "errors": s.get("errors", [])[:5],
            "generator": self.generator,
            "server": self.server,
            "slo": self.slo,
            "stopped_early": self.stopped_early,
        }


@dataclass
class CapacityResult:
    """The search's answer: ``capacity`` (highest rate met), ``ceiling`` (lowest missed)."""

    capacity: float | None
    ceiling: float | None
    precision: float
    reason: str
    probes: list[ProbeResult]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "capacity": self.capacity,
            "ceiling": self.ceiling,
            "precision": self.precision,
            "reason": self.reason,
            "probes": [p.to_dict() for p in self.probes],
        }


def stop_rule(slos: list[Slo]) -> StopRule:
    """When a probe can stop early: its first latency percentile (or max) objective and
    its error objective, once missed for good."""
    latency, quantile, errors = None, 0.99, None
    for slo in slos:
        if slo.op not in ("<", "<="):
            continue
        if slo.metric == "errors" and errors is None:
            errors = slo.threshold
        elif latency is None and (slo.metric in PERCENTILES or slo.metric == "max"):
            latency = slo.threshold
            quantile = PERCENTILES.get(slo.metric, 1.0)
    return StopRule(latency_ms=latency, quantile=quantile, max_error_rate=errors)


def generator_kept_up(generator: dict[str, Any], rate: float, stopped: bool = False) -> bool:
    """Whether the generator sent ``rate`` on time (else the probe cannot be judged: its
    own delay is in the latencies). A probe ``stopped`` early is judged on what it sent."""
    sent = float(generator.get("sent", 0))
    late = float(generator.get("late", 0)) / sent if sent else 0.0
    if late > MAX_LATE_SHARE:
        return False
    return stopped or float(generator.get("achieved_rate", 0.0)) >= MIN_SENT_SHARE * rate


def search(
    probe: Callable[[float], ProbeResult],
    *,
    start: float,
    min_rate: float,
    max_rate: float,
    precision: float,
    max_probes: int = 30,
) -> CapacityResult:
    """Find the highest rate in [min_rate, max_rate] at which ``probe`` meets the SLO,
    to within ``precision`` (relative)."""
    if not 0 < min_rate <= max_rate:
        raise ValueError("the rate bounds must satisfy 0 < min rate <= max rate")
    if precision <= 0:
        raise ValueError("the precision must be more than zero")
    rate = min(max(start, min_rate), max_rate)
    lo: float | None = None
    hi: float | None = None
    probes: list[ProbeResult] = []
    reason = f"stopped after {max_probes} probes"
    retried = False
    for _ in range(max_probes):
        result = probe(rate)
        probes.append(result)
        if result.ok is None and not retried:
            retried = True  # once: another process may have had the CPUs for a moment
            continue
        retried = False
        if result.ok is None:
            g = result.generator
            sent = float(g.get("achieved_rate", 0.0))
            late = float(g.get("late", 0)) / max(float(g.get("sent", 0)), 1.0)
            reason = (
                f"the load generator could not send {format_rate(rate)} on time "
                f"(it sent {format_rate(sent)}, {late * 100:.3g}% of requests late): "
                "give it CPUs of its own (another host, --workers)"
            )
            break
        if result.ok:
            lo = rate if lo is None else max(lo, rate)
        else:
            hi = rate if hi is None else min(hi, rate)
        if lo is not None and hi is not None:
            if hi <= lo * (1 + precision):
                reason = "found"
                break
            rate = math.sqrt(lo * hi)
        elif hi is None:
            if rate >= max_rate:
                reason = f"the SLO is met at the highest rate tried ({format_rate(max_rate)})"
                break
            rate = min(rate * 2, max_rate)
        else:
            if rate <= min_rate:
                reason = f"the SLO is missed even at the lowest rate ({format_rate(min_rate)})"
                break
            rate = max(rate / 2, min_rate)
    return CapacityResult(lo, hi, precision, reason, probes)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{number(value)}ms"


def format_capacity(result: CapacityResult, slo_text: str) -> str:
    """The probes as a table, then the answer in one line."""
    rows = [("rate", "sent", "p50", "p99", "errors", "server", "verdict")]
    for p in result.probes:
        lat = p.summary.get("latency_ms", {})
        causes = {row.get("cause") for row in (p.server or {}).get("versions", {}).values()} - {
            None
        }
        verdict = {True: "met", False: "MISSED", None: "not judged"}[p.ok]
        if p.stopped_early:
            verdict += " (stopped early)"
        rows.append(
            (
                format_rate(p.rate),
                "stopped"
                if p.stopped_early
                else format_rate(float(p.generator.get("achieved_rate", 0.0))),
                _ms(lat.get("p50")),
                _ms(lat.get("p99")),
                f"{p.summary.get('error_rate', 0.0) * 100:.3g}%",
                ",".join(sorted(str(c) for c in causes)) or "-",
                verdict,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    pct = f"{result.precision * 100:g}%"
    if result.capacity is None:
        lines.append(f"capacity: not found: {result.reason}")
    elif result.ceiling is None:
        lines.append(f"capacity: at least {format_rate(result.capacity)} ({result.reason})")
    elif result.reason == "found":
        lines.append(
            f"capacity: {format_rate(result.capacity)} meets {slo_text} "
            f"(missed at {format_rate(result.ceiling)}; precision {pct})"
        )
    else:
        lines.append(
            f"capacity: between {format_rate(result.capacity)} (meets {slo_text}) and "
            f"{format_rate(result.ceiling)} (misses it), not narrowed to {pct}: {result.reason}"
        )
    return "\n".join(lines)
