"""The load test report as one self-contained HTML page (no external assets).

Numbers are written as tables by Python; charts are drawn by the page's own script
(``loadtest/_report_js.py``) from the summary embedded as JSON. The header records every
setting of the run; the generator's and the gateways' sections follow the client's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from html import escape
from typing import Any, Final

from loadtest._report_js import REPORT_JS
from loadtest.html_parts import CSS, chart, fmt_ms, table, tile
from loadtest.report_sections import (
    render_generator,
    render_server,
    render_settings,
    server_chart_data,
)
from loadtest.summary import PERCENTILES

__all__ = ["embed_json", "render_html"]

_CHARTS: Final = (
    ("chart-throughput", "Throughput (requests/s; users dashed, right axis)"),
    ("chart-latency", "Latency percentiles over time (ms)"),
    ("chart-histogram", "Latency histogram (all requests)"),
    ("chart-versions", "Share of successful requests per served version"),
    ("chart-errors", "Error rate over time (%)"),
)


def embed_json(element_id: str, data: Any) -> str:
    """``data`` as a JSON script element the page's script reads."""
    payload = json.dumps(data).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{payload}</script>'


def render_html(summary: Mapping[str, Any]) -> str:
    """The report page for ``summary`` (see ``loadtest.summary.summarize``)."""
    lat = summary.get("latency_ms", {})
    config = summary.get("config", {})
    title = f"Fermion load test: {config.get('model') or config.get('replay') or '?'}"
    tiles = "".join(
        [
            tile("requests/s", f"{summary.get('rps', 0):.1f}"),
            tile("requests", str(summary.get("requests", 0))),
            tile("p50 latency", f"{fmt_ms(lat.get('p50'))} ms"),
            tile("p99 latency", f"{fmt_ms(lat.get('p99'))} ms"),
            tile("error rate", f"{summary.get('error_rate', 0) * 100:.3g}%"),
            tile("duration", f"{summary.get('duration_s', 0):.1f} s"),
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
    latency = table(keys, [[fmt_ms(lat.get(k)) for k in keys]], "no requests")
    version_rows = [
        [
            escape(f"v{v}"),
            str(row["requests"]),
            f"{row['share'] * 100:.1f}%",
            f"{row['rps']:.1f}",
            fmt_ms(row["latency_ms"].get("p50")),
            fmt_ms(row["latency_ms"].get("p99")),
        ]
        for v, row in summary.get("versions", {}).items()
    ]
    error_rows = [
        [str(e["status"]), escape(e["message"]), str(e["count"])] for e in summary.get("errors", [])
    ]
    charts = "".join(chart(cid, cap) for cid, cap in _CHARTS)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{escape(title)}</title><style>{CSS}</style></head>
<body data-charts="0">
<h1>{escape(title)}</h1>
<p class="sub">{escape(str(summary.get("started_at") or ""))}</p>
{render_settings(config)}
<div class="tiles">{tiles}</div>
<h2>Service-level objectives</h2>
{table(["objective", "measured", "verdict"], slo_rows, "none set (--slo)")}
<h2>Charts</h2>
<div class="charts">{charts}</div>
<h2>Latency (ms, all requests)</h2>
{latency}
<h2>Served versions</h2>
{table(["version", "requests", "share", "req/s", "p50 ms", "p99 ms"], version_rows, "none")}
<h2>Errors</h2>
{table(["status", "message", "count"], error_rows, "no errors")}
{render_generator(summary.get("generator"))}
{render_server(summary)}
{embed_json("fermion-data", summary)}
{embed_json("fermion-charts", server_chart_data(summary))}
<script>{REPORT_JS}</script>
</body></html>
"""
