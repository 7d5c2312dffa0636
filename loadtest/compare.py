"""Two load test reports side by side (e.g. before and after a rollout), with deltas.

A difference is called better or WORSE only beyond a noise threshold, stated in the
output: a relative ``noise`` (default 5%), raised for requests/s and the p50/p90/p99
latencies (and each version's p99) to what the runs' own second-to-second spread makes
significant (two standard errors of each run's per-second values, combined); the error
rate is judged by a two-proportion test (a change beyond two standard errors). Runs
whose settings differ are compared with a warning naming each difference.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from loadtest.summary import PERCENTILES, number

__all__ = [
    "DEFAULT_NOISE",
    "Delta",
    "compare",
    "format_comparison",
    "load_summary",
    "settings_differences",
]

SUMMARY_FILE = "summary.json"
#: Relative changes up to this are called noise unless the runs' spread says more.
DEFAULT_NOISE: Final = 0.05
#: Settings that say nothing about the result (where the report was written...).
_NOT_SETTINGS: Final = frozenset({"url", "samples"})


@dataclass(frozen=True)
class Delta:
    """One metric in both reports; ``better`` is None when it cannot be judged."""

    metric: str
    a: float | None
    b: float | None
    unit: str
    higher_is_better: bool | None
    #: Changes up to this (absolute, in the metric's unit) are noise.
    threshold: float = 0.0

    @property
    def change(self) -> float | None:
        """``b - a``, when both were measured."""
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def relative(self) -> float | None:
        """``(b - a) / a``, when both were measured and ``a`` is not zero."""
        change = self.change
        return None if change is None or not self.a else change / self.a

    @property
    def better(self) -> bool | None:
        """Whether B is better than A on this metric (None: same, or no direction)."""
        change = self.change
        if change is None or abs(change) <= self.threshold or self.higher_is_better is None:
            return None
        return (change > 0) == self.higher_is_better

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "metric": self.metric,
            "a": self.a,
            "b": self.b,
            "unit": self.unit,
            "change": self.change,
            "relative": self.relative,
            "noise": self.threshold,
            "better": self.better,
        }


def load_summary(path: Path) -> dict[str, Any]:
    """A report's summary, from its folder or its ``summary.json``."""
    file = path / SUMMARY_FILE if path.is_dir() else path
    try:
        data: dict[str, Any] = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"no load test report at {path} (no {file.name})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not a load test summary: {e}") from None
    if not isinstance(data, dict) or "latency_ms" not in data:
        raise ValueError(f"{file} is not a load test summary")
    return data


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _spread(summary: Mapping[str, Any], key: str) -> float:
    """Two standard errors of the mean of a per-second series, relative to its mean
    (the first and last seconds, partly outside the run, left out)."""
    timeline = summary.get("timeline", [])[1:-1]
    values = [float(p[key]) for p in timeline if p.get(key) is not None]
    if len(values) < 3:
        return 0.0
    mean = statistics.fmean(values)
    if mean <= 0:
        return 0.0
    return 2 * statistics.stdev(values) / math.sqrt(len(values)) / mean


def _relative(
    metric: str,
    a: float | None,
    b: float | None,
    unit: str,
    higher: bool | None,
    noise: float,
    spread: float = 0.0,
) -> Delta:
    base = abs(a) if a is not None else 0.0
    return Delta(metric, a, b, unit, higher, base * max(noise, spread))


def _error_threshold(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    na, nb = int(a.get("requests") or 0), int(b.get("requests") or 0)
    if not na or not nb:
        return 0.0
    pooled = (int(a.get("failures") or 0) + int(b.get("failures") or 0)) / (na + nb)
    return 2 * math.sqrt(pooled * (1 - pooled) * (1 / na + 1 / nb))


def compare(
    a: Mapping[str, Any], b: Mapping[str, Any], noise: float = DEFAULT_NOISE
) -> list[Delta]:
    """Every metric of both summaries: throughput, errors, latency, per-version share,
    each with the threshold below which its change is noise."""

    def both(key: str) -> float:
        return math.hypot(_spread(a, key), _spread(b, key))

    rows = [
        _relative(
            "requests/s", _num(a.get("rps")), _num(b.get("rps")), "/s", True, noise, both("rps")
        ),
        Delta("requests", _num(a.get("requests")), _num(b.get("requests")), "", None),
        Delta(
            "error rate",
            _num(a.get("error_rate")),
            _num(b.get("error_rate")),
            "%",
            False,
            _error_threshold(a, b),
        ),
    ]
    la, lb = a.get("latency_ms", {}), b.get("latency_ms", {})
    for key in ("mean", *PERCENTILES, "max"):
        spread = both(key) if key in ("p50", "p90", "p99") else 0.0
        rows.append(
            _relative(
                f"{key} latency", _num(la.get(key)), _num(lb.get(key)), "ms", False, noise, spread
            )
        )
    va, vb = a.get("versions", {}), b.get("versions", {})
    for version in sorted(set(va) | set(vb), key=lambda v: (not v.isdigit(), v.zfill(12))):
        ra, rb = va.get(version, {}), vb.get(version, {})
        rows.append(
            Delta(
                f"v{version} share", _num(ra.get("share", 0)), _num(rb.get("share", 0)), "%", None
            )
        )
        rows.append(
            _relative(
                f"v{version} p99 latency",
                _num(ra.get("latency_ms", {}).get("p99")),
                _num(rb.get("latency_ms", {}).get("p99")),
                "ms",
                False,
                noise,
                both("p99"),  # a version's own per-second p99 is not kept: the run's spread
            )
        )
    return rows


def settings_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """``"key: A vs B"`` for every setting that differs between the two runs."""
    ca, cb = a.get("config", {}) or {}, b.get("config", {}) or {}
    out = []
    for key in sorted((set(ca) | set(cb)) - _NOT_SETTINGS):
        if ca.get(key) != cb.get(key):
            out.append(f"{key}: {ca.get(key)} vs {cb.get(key)}")
    return out


def _show(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{value * 100:.3g}%"
    if unit == "ms":
        return f"{number(value)}ms"
    if unit == "/s":
        return f"{value:.1f}/s"
    return f"{value:g}"


def format_comparison(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    names: tuple[str, str] = ("A", "B"),
    noise: float = DEFAULT_NOISE,
) -> str:
    """A text table of ``compare(a, b)``: metric, A, B, delta (and %), noise, verdict;
    a warning first when the runs' settings differ."""
    table = [("metric", names[0], names[1], "delta", "noise", "")]
    for d in compare(a, b, noise):
        change = d.change
        if change is None:
            delta = "-"
        else:
            step = _show(abs(change), d.unit)
            delta = ("+" if change >= 0 else "-") + step
            if d.relative is not None and d.unit != "%":
                delta += f" ({d.relative * 100:+.1f}%)"
        verdict = {True: "better", False: "WORSE", None: ""}[d.better]
        if d.better is None and d.higher_is_better is not None and change:
            verdict = "~ (noise)"
        shown = "-" if d.higher_is_better is None else "±" + _show(d.threshold, d.unit)
        table.append((d.metric, _show(d.a, d.unit), _show(d.b, d.unit), delta, shown, verdict))
    widths = [max(len(row[i]) for row in table) for i in range(6)]
    lines = []
    differ = settings_differences(a, b)
    if differ:
        lines.append("WARNING: the runs' settings differ, so their numbers may not compare:")
        lines += [f"  {d}" for d in differ]
    lines.append(
        f"better/WORSE only beyond the noise column: ±{noise * 100:g}% of A, or two standard "
        "errors of the runs' per-second values where larger; error rate: two standard errors."
    )
    for row in table:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:5], widths[1:5], strict=True)
        ]
        lines.append("  ".join([*cells, row[5]]).rstrip())
    return "\n".join(lines)
