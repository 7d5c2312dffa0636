"""What a probed gateway did over time (``bench/_probe.py``): a summary and an SVG plot.

The plot has one panel per probed server: the server's own time per request in
100 ms windows (p50, p99 and max) over the run, with every cycle collection drawn
as a tick at its start, as tall as its pause (full collections red), and the
event loop's late wake-ups over 5 ms as grey dots.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

__all__ = ["ProbeSummary", "render_svg", "summarize"]

_WINDOW_S = 0.1
_WIDTH, _PANEL, _PAD = 900, 220, 48


@dataclass(frozen=True)
class ProbeSummary:
    """One probed run, over the time its requests were answered."""

    label: str
    requests: int
    seconds: float
    #: generation -> (collections, total ms, longest ms)
    collections: dict[int, tuple[int, float, float]]
    p50_ms: float
    p99_ms: float
    max_ms: float
    lag_max_ms: float
    lags_over_5ms: int
    heap_at_exit: dict[str, int]
    #: ONNX Runtime runs: how many, mean rows, and their wall time beyond the calling
    #: thread's CPU time (mean, p90, ms): the thread waiting, mostly for the GIL.
    batches: int = 0
    batch_rows: float = 0.0
    batch_wait_ms: float = 0.0
    batch_wait_p90_ms: float = 0.0

    def lines(self) -> list[str]:
        """The summary as text lines."""
        out = [
            f"{self.label}: {self.requests} requests in {self.seconds:.1f} s; server time "
            f"p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms, max {self.max_ms:.1f} ms; "
            f"loop late by > 5 ms {self.lags_over_5ms} times (longest {self.lag_max_ms:.1f} ms)"
        ]
        for generation, (n, total, longest) in sorted(self.collections.items()):
            out.append(
                f"  gen{generation} collections: {n} ({n / max(self.seconds, 1e-9):.1f}/s), "
                f"{total:.0f} ms in all, longest {longest:.1f} ms"
            )
        if self.batches:
            out.append(
                f"  ONNX Runtime runs: {self.batches} ({self.batch_rows:.1f} rows each); wall "
                f"time beyond the thread's CPU: mean {self.batch_wait_ms:.2f} ms, "
                f"p90 {self.batch_wait_p90_ms:.2f} ms"
            )
        heap = self.heap_at_exit
        out.append(f"  heap at exit: {heap}")
        return out


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _span(probe: dict[str, Any]) -> tuple[float, float]:
    requests = probe["requests"]
    if not requests:
        return 0.0, 0.0
    return requests[0][0], requests[-1][0]


def summarize(label: str, probe: dict[str, Any]) -> ProbeSummary:
    """The collections, loop lag and request times of ``probe`` while it served."""
    t0, t1 = _span(probe)
    times = [r[1] for r in probe["requests"]]
    collections: dict[int, tuple[int, float, float]] = {}
    for start, generation, ms, _ in probe["gc"]:
        if t0 <= start <= t1:
            n, total, longest = collections.get(int(generation), (0, 0.0, 0.0))
            collections[int(generation)] = (n + 1, total + ms, max(longest, ms))
    lags = [ms for at, ms in probe["lag"] if t0 <= at <= t1]
    batches = [b for b in probe.get("batches", []) if t0 <= b[0] <= t1]
    waits = [wall - cpu for _, _, wall, cpu in batches]
    return ProbeSummary(
        label=label,
        requests=len(times),
        seconds=t1 - t0,
        collections=collections,
        p50_ms=_quantile(times, 0.5),
        p99_ms=_quantile(times, 0.99),
        max_ms=max(times, default=0.0),
        lag_max_ms=max(lags, default=0.0),
        lags_over_5ms=sum(1 for ms in lags if ms > 5),
        heap_at_exit=probe.get("heap_at_exit", {}),
        batches=len(batches),
        batch_rows=statistics.fmean(b[1] for b in batches) if batches else 0.0,
        batch_wait_ms=statistics.fmean(waits) if waits else 0.0,
        batch_wait_p90_ms=_quantile(waits, 0.9),
    )


def _windows(probe: dict[str, Any], t0: float) -> list[tuple[float, float, float, float]]:
    """(window start, p50, p99, max) of the request times in each window."""
    buckets: dict[int, list[float]] = {}
    for start, ms in probe["requests"]:
        buckets.setdefault(int((start - t0) / _WINDOW_S), []).append(ms)
    return [
        (i * _WINDOW_S, statistics.median(v), _quantile(v, 0.99), max(v))
        for i, v in sorted(buckets.items())
    ]


def _panel(label: str, probe: dict[str, Any], top: float, y_max: float, seconds: float) -> str:
    t0, _ = _span(probe)
    plot_w, plot_h = _WIDTH - 2 * _PAD, _PANEL - 2 * _PAD + 20

    def x(t: float) -> float:
        return _PAD + plot_w * min(max(t, 0.0), seconds) / seconds

    def y(ms: float) -> float:
        return top + _PAD + plot_h * (1 - min(ms, y_max) / y_max)

    parts = [
        f'<text x="{_PAD}" y="{top + 20}" font-weight="bold">{escape(label)}</text>',
        f'<rect x="{_PAD}" y="{top + _PAD}" width="{plot_w}" height="{plot_h}" '
        'fill="none" stroke="#999"/>',
    ]
    for tick in range(5):
        ms = y_max * tick / 4
        parts.append(
            f'<text x="{_PAD - 6}" y="{y(ms) + 4:.1f}" text-anchor="end" font-size="10">'
            f"{ms:.0f}</text>"
        )
    windows = _windows(probe, t0)
    for key, colour in ((3, "#bbb"), (2, "#e67e22"), (1, "#2c7fb8")):
        points = " ".join(f"{x(w[0]):.1f},{y(w[key]):.1f}" for w in windows)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.2" points="{points}"/>'
        )
    for start, generation, ms, _ in probe["gc"]:
        t = start - t0
        if 0 <= t <= seconds and ms >= 0.2:
            colour = "#d62728" if generation == 2 else "#9467bd"
            parts.append(
                f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{y(0):.1f}" y2="{y(ms):.1f}" '
                f'stroke="{colour}" stroke-width="2"/>'
            )
    for at, ms in probe["lag"]:
        t = at - t0
        if 0 <= t <= seconds and ms > 5:
            parts.append(f'<circle cx="{x(t):.1f}" cy="{y(ms):.1f}" r="1.5" fill="#555"/>')
    return "\n".join(parts)


def render_svg(probes: list[tuple[str, dict[str, Any]]], out: Path) -> None:
    """Write the panels of ``probes`` (label, probe record) to ``out``."""
    seconds = max((_span(p)[1] - _span(p)[0] for _, p in probes), default=1.0) or 1.0
    y_max = max(
        (max((w[3] for w in _windows(p, _span(p)[0])), default=1.0) for _, p in probes),
        default=1.0,
    )
    y_max = max(5.0, min(y_max, 250.0))
    height = _PANEL * len(probes) + 40
    body = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
    ]
    for i, (label, probe) in enumerate(probes):
        body.append(_panel(label, probe, i * _PANEL, y_max, seconds))
    legend_y = _PANEL * len(probes) + 20
    body.append(
        f'<text x="{_PAD}" y="{legend_y}" font-size="11">server time per request, ms, '
        "100 ms windows: p50 (blue), p99 (orange), max (grey); cycle collections: full "
        "(red), young (purple), as tall as their pause; loop late by &gt; 5 ms: dots; "
        f"x: 0-{seconds:.0f} s</text>"
    )
    body.append("</svg>")
    out.write_text("\n".join(body) + "\n")
