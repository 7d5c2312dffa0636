"""Service-level objectives for a load test: ``--slo "p99<50ms,errors<0.1%,rps>=200"``.

Each objective names a metric of the summary (``p50``, ``p90``, ``p95``, ``p99``,
``p99.9``, ``mean`` or ``max`` latency; ``errors``, the failed share of requests;
``rps``, requests per second), a comparison (``<``, ``<=``, ``>``, ``>=``) and a
threshold (latency in ``us``, ``ms`` (default) or ``s``; errors in ``%`` or as a fraction).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from loadtest.summary import PERCENTILES, number

__all__ = ["Slo", "SloResult", "evaluate", "parse_slos"]

_LATENCY: Final = (*PERCENTILES, "mean", "max")
_OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_TIME_UNITS: Final = {"us": 0.001, "ms": 1.0, "s": 1000.0}
_PATTERN = re.compile(
    r"^\s*(?P<metric>[a-z][a-z0-9.]*)\s*(?P<op><=|>=|<|>)\s*"
    r"(?P<value>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>us|ms|s|%)?\s*$"
)


@dataclass(frozen=True)
class Slo:
    """One objective: ``metric op threshold`` (latency in ms, errors as a fraction)."""

    text: str
    metric: str
    op: str
    threshold: float

    def describe(self, value: float) -> str:
        """``value`` in this objective's metric, with its unit."""
        if self.metric == "errors":
            return f"{value * 100:.3g}%"
        if self.metric == "rps":
            return f"{value:.1f}/s"
        return f"{number(value)}ms"


@dataclass(frozen=True)
class SloResult:
    """An objective and what was measured against it."""

    slo: Slo
    measured: float | None
    ok: bool

    def line(self) -> str:
        """A one-line verdict, e.g. ``MISSED p99<50ms: measured 61.2ms``."""
        word = "met   " if self.ok else "MISSED"
        got = "no requests" if self.measured is None else self.slo.describe(self.measured)
        return f"{word} {self.slo.text}: measured {got}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form kept in the report's summary."""
        return {
            "slo": self.slo.text,
            "metric": self.slo.metric,
            "op": self.slo.op,
            "threshold": self.slo.threshold,
            "measured": self.measured,
            "measured_text": None if self.measured is None else self.slo.describe(self.measured),
            "ok": self.ok,
        }


def _parse_one(text: str) -> Slo:
    m = _PATTERN.match(text)
    if m is None:
        raise ValueError(f"invalid SLO {text!r} (e.g. p99<50ms, errors<0.1%, rps>100)")
    metric, op, value, unit = m["metric"], m["op"], float(m["value"]), m["unit"]
    if metric in _LATENCY:
        if unit == "%":
            raise ValueError(f"invalid SLO {text!r}: latency takes us, ms or s")
        threshold = value * _TIME_UNITS[unit or "ms"]
    elif metric == "errors":
        if unit not in (None, "%"):
            raise ValueError(f"invalid SLO {text!r}: errors take % or a fraction")
        threshold = value / 100.0 if unit == "%" else value
    elif metric == "rps":
        if unit is not None:
            raise ValueError(f"invalid SLO {text!r}: rps takes a plain number")
        threshold = value
    else:
        known = ", ".join((*_LATENCY, "errors", "rps"))
        raise ValueError(f"invalid SLO {text!r}: unknown metric {metric!r} (one of {known})")
    return Slo(text=text.strip().replace(" ", ""), metric=metric, op=op, threshold=threshold)


def parse_slos(text: str) -> list[Slo]:
    """The comma-separated objectives in ``text`` (ValueError names a bad one)."""
    return [_parse_one(part) for part in text.split(",") if part.strip()]


def _measured(slo: Slo, summary: Mapping[str, Any]) -> float | None:
    if not summary.get("requests"):
        return None
    if slo.metric == "errors":
        return float(summary["error_rate"])
    if slo.metric == "rps":
        return float(summary["rps"])
    value = summary.get("latency_ms", {}).get(slo.metric)
    return None if value is None else float(value)


def evaluate(slos: list[Slo], summary: Mapping[str, Any]) -> list[SloResult]:
    """Each objective checked against a report's summary (missed when nothing was measured)."""
    results = []
    for slo in slos:
        value = _measured(slo, summary)
        ok = value is not None and _OPS[slo.op](value, slo.threshold)
        results.append(SloResult(slo, value, ok))
    return results
