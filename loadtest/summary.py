"""The numbers of a load test: what the recorder measured, summarized for people and gates.

``summarize`` turns a recorder's JSON into the report's summary (requests/s, latency
percentiles, errors by status and message, per-version share and latency, a per-second
timeline and a latency histogram); ``write_history`` writes the timeline as CSV.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from loadtest.recorder import FAILED

__all__ = ["PERCENTILES", "number", "summarize", "write_history"]

#: The latency percentiles a summary reports (and SLOs may name).
PERCENTILES: Final = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99, "p99.9": 0.999}

_HISTOGRAM_BINS: Final = 40
_TIMELINE_PERCENTILES: Final = ("p50", "p90", "p99")

_Hist = dict[int, int]


def number(value: float) -> str:
    """``value`` to three significant digits for people, never in e-notation
    (``0.347``, ``12.5``, ``149``, ``1850``, ``29800``)."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _add(into: _Hist, hist: Mapping[Any, Any]) -> None:
    for bucket, n in hist.items():
        b = int(bucket)
        into[b] = into.get(b, 0) + int(n)


def _latency(hist: _Hist, keys: Iterable[str] = PERCENTILES) -> dict[str, float]:
    """Percentiles, min, mean and max of ``hist`` (microsecond buckets), in milliseconds."""
    total = sum(hist.values())
    if total == 0:
        return {}
    items = sorted(hist.items())
    out: dict[str, float] = {
        "min": items[0][0] / 1000.0,
        "mean": sum(b * n for b, n in items) / total / 1000.0,
        "max": items[-1][0] / 1000.0,
    }
    for key in keys:
        rank = max(1, math.ceil(PERCENTILES[key] * total))
        seen = 0
        for bucket, n in items:
            seen += n
            if seen >= rank:
                out[key] = bucket / 1000.0
                break
    return out


def _histogram(hist: _Hist) -> list[dict[str, float]]:
    """``hist`` in geometric bins between its smallest and largest latency."""
    if not hist:
        return []
    lo, hi = max(min(hist), 1), max(max(hist), 1)
    if hi <= lo:
        return [{"lo_ms": lo / 1000.0, "hi_ms": hi / 1000.0, "count": sum(hist.values())}]
    ratio = (hi / lo) ** (1.0 / _HISTOGRAM_BINS)
    edges = [lo * ratio**i for i in range(_HISTOGRAM_BINS + 1)]
    counts = [0] * _HISTOGRAM_BINS
    for bucket, n in hist.items():
        i = int(math.log(max(bucket, 1) / lo) / math.log(ratio)) if bucket > lo else 0
        counts[min(max(i, 0), _HISTOGRAM_BINS - 1)] += n
    return [
        {"lo_ms": edges[i] / 1000.0, "hi_ms": edges[i + 1] / 1000.0, "count": counts[i]}
        for i in range(_HISTOGRAM_BINS)
    ]


def _split_error(label: str) -> tuple[int, str]:
    status, _, message = label.partition(" ")
    return (int(status), message) if status.isdigit() else (0, label)


def summarize(raw: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary of a recorder's JSON (``Recorder.to_dict()``), with the run's ``config``."""
    seconds = sorted((int(k), v) for k, v in raw.get("seconds", {}).items())
    overall: _Hist = {}
    by_version: dict[str, _Hist] = {}
    errors: dict[str, int] = {}
    timeline: list[dict[str, Any]] = []
    first = seconds[0][0] if seconds else 0
    last = seconds[-1][0] if seconds else -1
    rows = dict(seconds)
    for sec in range(first, last + 1):
        row = rows.get(sec, {})
        this: _Hist = {}
        versions: dict[str, int] = {}
        for version, hist in row.get("latency", {}).items():
            _add(this, hist)
            if version != FAILED:
                _add(by_version.setdefault(version, {}), hist)
                versions[version] = sum(int(n) for n in hist.values())
        _add(overall, this)
        failures = 0
        for label, n in row.get("errors", {}).items():
            errors[label] = errors.get(label, 0) + int(n)
            failures += int(n)
        point: dict[str, Any] = {
            "t": sec - first,
            "ts": sec,
            "users": row.get("users"),
            "rps": sum(this.values()),
            "failures": failures,
            "versions": versions,
        }
        point.update(
            {k: v for k, v in _latency(this, _TIMELINE_PERCENTILES).items() if k[0] == "p"}
        )
        timeline.append(point)
    requests = sum(overall.values())
    failures = sum(errors.values())
    start, end = raw.get("start"), raw.get("end")
    duration = float(end - start) if start is not None and end is not None else 0.0
    ok_total = sum(sum(h.values()) for h in by_version.values())
    version_rows = {}
    for version in sorted(by_version, key=lambda v: (not v.isdigit(), v.zfill(12))):
        n = sum(by_version[version].values())
        version_rows[version] = {
            "requests": n,
            "share": n / ok_total if ok_total else 0.0,
            "rps": n / duration if duration > 0 else 0.0,
            "latency_ms": _latency(by_version[version]),
        }
    return {
        "schema": 1,
        "config": dict(config or {}),
        "started_at": datetime.fromtimestamp(start, UTC).isoformat() if start else None,
        "duration_s": duration,
        "requests": requests,
        "failures": failures,
        "error_rate": failures / requests if requests else 0.0,
        "rps": requests / duration if duration > 0 else 0.0,
        "latency_ms": _latency(overall),
        "errors": [
            {"status": s, "message": m, "count": n}
            for (s, m), n in sorted(
                ((_split_error(label), n) for label, n in errors.items()), key=lambda e: -e[1]
            )
        ],
        "versions": version_rows,
        "timeline": timeline,
        "histogram": _histogram(overall),
        "workers": int(raw.get("workers", 0)),
        "slo": [],
    }


def write_history(summary: Mapping[str, Any], path: Path) -> None:
    """The per-second timeline of ``summary`` as CSV (one row a second)."""
    versions = list(summary.get("versions", {}))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "timestamp",
                "elapsed_s",
                "users",
                "requests_per_s",
                "failures_per_s",
                *(f"{p}_ms" for p in _TIMELINE_PERCENTILES),
                *(f"v{v}_per_s" for v in versions),
            ]
        )
        for point in summary.get("timeline", []):
            writer.writerow(
                [
                    point["ts"],
                    point["t"],
                    "" if point.get("users") is None else point["users"],
                    point["rps"],
                    point["failures"],
                    *(point.get(p, "") for p in _TIMELINE_PERCENTILES),
                    *(point["versions"].get(v, 0) for v in versions),
                ]
            )
