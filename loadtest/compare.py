"""Two load test reports side by side (e.g. before and after a rollout), with deltas."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.summary import PERCENTILES

__all__ = ["Delta", "compare", "format_comparison", "load_summary"]

SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class Delta:
    """One metric in both reports; ``better`` is None when it cannot be judged."""

    metric: str
    a: float | None
    b: float | None
    unit: str
    higher_is_better: bool | None

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
        if change is None or change == 0 or self.higher_is_better is None:
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


def compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[Delta]:
    """Every metric of both summaries: throughput, errors, latency, per-version share."""
    rows = [
        Delta("requests/s", _num(a.get("rps")), _num(b.get("rps")), "/s", True),
        Delta("requests", _num(a.get("requests")), _num(b.get("requests")), "", None),
        Delta("error rate", _num(a.get("error_rate")), _num(b.get("error_rate")), "%", False),
    ]
    la, lb = a.get("latency_ms", {}), b.get("latency_ms", {})
    for key in ("mean", *PERCENTILES, "max"):
        rows.append(Delta(f"{key} latency", _num(la.get(key)), _num(lb.get(key)), "ms", False))
    va, vb = a.get("versions", {}), b.get("versions", {})
    for version in sorted(set(va) | set(vb), key=lambda v: (not v.isdigit(), v.zfill(12))):
        ra, rb = va.get(version, {}), vb.get(version, {})
        rows.append(
            Delta(
                f"v{version} share", _num(ra.get("share", 0)), _num(rb.get("share", 0)), "%", None
            )
        )
        rows.append(
            Delta(
                f"v{version} p99 latency",
                _num(ra.get("latency_ms", {}).get("p99")),
                _num(rb.get("latency_ms", {}).get("p99")),
                "ms",
                False,
            )
        )
    return rows


def _show(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{value * 100:.3g}%"
    if unit == "ms":
        return f"{value:.3g}ms"
    if unit == "/s":
        return f"{value:.1f}/s"
    return f"{value:g}"


def format_comparison(
    a: Mapping[str, Any], b: Mapping[str, Any], names: tuple[str, str] = ("A", "B")
) -> str:
    """A text table of ``compare(a, b)``: metric, A, B, delta (and %), verdict."""
    table = [("metric", names[0], names[1], "delta", "")]
    for d in compare(a, b):
        change = d.change
        if change is None:
            delta = "-"
        else:
            step = _show(abs(change), d.unit)
            delta = ("+" if change >= 0 else "-") + step
            if d.relative is not None and d.unit != "%":
                delta += f" ({d.relative * 100:+.1f}%)"
        verdict = {True: "better", False: "WORSE", None: ""}[d.better]
        table.append((d.metric, _show(d.a, d.unit), _show(d.b, d.unit), delta, verdict))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = []
    for row in table:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:4], widths[1:4], strict=True)
        ]
        lines.append("  ".join([*cells, row[4]]).rstrip())
    return "\n".join(lines)
