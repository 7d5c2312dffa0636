"""The load test report as one self-contained HTML page (no external assets).

Numbers are written as tables by Python; charts are drawn by the page's own script
(``loadtest/_report_js.py``) from the summary embedded as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from html import escape
from typing import Any, Final

from loadtest._report_js import REPORT_JS
from loadtest.summary import PERCENTILES

__all__ = ["render_html"]

_CHARTS: Final = (
    ("chart-throughput", "Throughput (requests/s; users dashed, right axis)"),
    ("chart-latency", "Latency percentiles over time (ms)"),
    ("chart-histogram", "Latency histogram (all requests)"),
    ("chart-versions", "Share of successful requests per served version"),
    ("chart-errors", "Error rate over time (%)"),
)

_CSS: Final = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;
max-width:1100px;padding:0 16px;color:#111827;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.sub{color:#6b7280;margin:0 0 16px}
.tiles{display:flex;flex-wrap:wrap;gap:12px}
.tile{border:1px solid #e5e7eb;border-radius:8px;padding:10px 14px;min-width:120px}
.tile b{display:block;font-size:20px}.tile span{color:#6b7280;font-size:12px}
table{border-collapse:collapse;margin:4px 0}td,th{border-bottom:1px solid #e5e7eb;
padding:4px 12px;text-align:right}th:first-child,td:first-child{text-align:left}
.ok{color:#15803d;font-weight:600}.missed{color:#b91c1c;font-weight:600}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:16px}
figure.chart{margin:0;border:1px solid #e5e7eb;border-radius:8px;padding:8px}
figcaption{font-weight:600;margin-bottom:4px}svg.plot{width:100%;height:auto}
.grid{stroke:#e5e7eb}.tick{font-size:11px;fill:#6b7280}.legend{font-size:12px;fill:#374151}
.empty{fill:#9ca3af;font-size:14px}
"""


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def _tile(label: str, value: str) -> str:
    return f'<div class="tile"><b>{escape(value)}</b><span>{escape(label)}</span></div>'


def _table(head: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f"<p>{escape(empty)}</p>"
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _config_text(config: Mapping[str, Any]) -> str:
    keys = ("url", "model", "users", "spawn_rate", "duration", "shape", "binary", "workers")
    parts = [f"{k}={config[k]}" for k in keys if config.get(k) not in (None, "")]
    return " · ".join(parts)


def render_html(summary: Mapping[str, Any]) -> str:
    """The report page for ``summary`` (see ``loadtest.summary.summarize``)."""
    lat = summary.get("latency_ms", {})
    config = summary.get("config", {})
    title = f"Fermion load test: {config.get('model', '?')}"
    tiles = "".join(
        [
            _tile("requests/s", f"{summary.get('rps', 0):.1f}"),
            _tile("requests", str(summary.get("requests", 0))),
            _tile("p50 latency", f"{_ms(lat.get('p50'))} ms"),
            _tile("p99 latency", f"{_ms(lat.get('p99'))} ms"),
            _tile("error rate", f"{summary.get('error_rate', 0) * 100:.3g}%"),
            _tile("duration", f"{summary.get('duration_s', 0):.1f} s"),
        ]
    )
    slo_rows = [
        [
            escape(r["slo"]),
            escape(r.get("measured_text") or "-"),
            '<span class="ok">met</span>' if r["ok"] else '<span class="missed">MISSED</span>',
        ]
        for r in summary.get("slo", [])
    ]
    keys = ["min", "mean", *PERCENTILES, "max"]
    latency = _table(keys, [[_ms(lat.get(k)) for k in keys]], "no requests")
    version_rows = [
        [
            escape(f"v{v}"),
            str(row["requests"]),
            f"{row['share'] * 100:.1f}%",
            f"{row['rps']:.1f}",
            _ms(row["latency_ms"].get("p50")),
            _ms(row["latency_ms"].get("p99")),
        ]
        for v, row in summary.get("versions", {}).items()
    ]
    error_rows = [
        [str(e["status"]), escape(e["message"]), str(e["count"])] for e in summary.get("errors", [])
    ]
    charts = "".join(
        f'<figure class="chart" id="{cid}"><figcaption>{escape(cap)}</figcaption></figure>'
        for cid, cap in _CHARTS
    )
    payload = json.dumps(summary).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{escape(title)}</title><style>{_CSS}</style></head>
<body data-charts="0">
<h1>{escape(title)}</h1>
<p class="sub">{escape(str(summary.get("started_at") or ""))} · {escape(_config_text(config))}</p>
<div class="tiles">{tiles}</div>
<h2>Service-level objectives</h2>
{_table(["objective", "measured", "verdict"], slo_rows, "none set (--slo)")}
<h2>Charts</h2>
<div class="charts">{charts}</div>
<h2>Latency (ms, all requests)</h2>
{latency}
<h2>Served versions</h2>
{_table(["version", "requests", "share", "req/s", "p50 ms", "p99 ms"], version_rows, "none")}
<h2>Errors</h2>
{_table(["status", "message", "count"], error_rows, "no errors")}
<script type="application/json" id="fermion-data">{payload}</script>
<script>{REPORT_JS}</script>
</body></html>
"""
