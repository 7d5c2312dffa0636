"""The capacity search's page: rate vs p50/p99 (with the SLO's threshold), each probe's
verdict, and where the gateways spent the time at each rate."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

from loadtest._report_js import REPORT_JS
from loadtest.html_parts import CSS, chart, fmt_ms, table
from loadtest.rates import format_rate
from loadtest.report_html import embed_json
from loadtest.report_sections import render_settings
from loadtest.slo import parse_slos

__all__ = ["capacity_chart_data", "render_capacity_html"]

_CAPTION = "Latency by arrival rate (ms; objectives dashed)"


def capacity_chart_data(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Series of the rate chart: p50 and p99 by rate, and each latency objective."""
    probes = sorted(
        (p for p in doc.get("probes", []) if p.get("latency_ms")), key=lambda p: p["rate"]
    )
    series: list[dict[str, Any]] = [
        {"name": key, "points": [[p["rate"], p["latency_ms"].get(key)] for p in probes]}
        for key in ("p50", "p99")
    ]
    if probes:
        lo, hi = probes[0]["rate"], probes[-1]["rate"]
        for slo in parse_slos(str(doc.get("slo") or "")):
            if slo.metric not in ("errors", "rps"):
                series.append(
                    {
                        "name": slo.text,
                        "dashed": True,
                        "points": [[lo, slo.threshold], [hi, slo.threshold]],
                    }
                )
    return {"capacity": series}


def _server_cell(probe: Mapping[str, Any]) -> str:
    parts = []
    for name, row in ((probe.get("server") or {}).get("versions") or {}).items():
        q, c = row["queue_ms"].get("p99"), row["compute_ms"].get("p99")
        parts.append(
            f"{name}: queue p99 {fmt_ms(q)}, compute p99 {fmt_ms(c)} ({row.get('cause') or '-'})"
        )
    return escape("; ".join(parts) or "-")


def render_capacity_html(doc: Mapping[str, Any]) -> str:
    """The page for a capacity search (``capacity.json``'s content)."""
    capacity, ceiling = doc.get("capacity"), doc.get("ceiling")
    precision = f"{float(doc.get('precision', 0)) * 100:g}%"
    slo = str(doc.get("slo", ""))
    if capacity is None:
        answer = f"No rate met {slo}: {doc.get('reason')}"
    elif ceiling is None:
        answer = f"At least {format_rate(capacity)} meets {slo} ({doc.get('reason')})"
    elif doc.get("reason") != "found":
        answer = (
            f"{format_rate(capacity)} meets {slo}; {format_rate(ceiling)} misses it; "
            f"not narrowed to {precision}: {doc.get('reason')}"
        )
    else:
        answer = (
            f"{format_rate(capacity)} meets {slo}; {format_rate(ceiling)} misses it "
            f"(precision {precision})"
        )
    rows = []
    for p in doc.get("probes", []):
        lat = p.get("latency_ms") or {}
        verdict = {True: '<span class="ok">met</span>', False: '<span class="missed">MISSED</span>'}
        rows.append(
            [
                format_rate(p["rate"]),
                "stopped"
                if p.get("stopped_early")
                else format_rate(float((p.get("generator") or {}).get("achieved_rate", 0.0))),
                str(p.get("requests", 0)),
                fmt_ms(lat.get("p50")),
                fmt_ms(lat.get("p99")),
                f"{float(p.get('error_rate', 0)) * 100:.3g}%",
                verdict.get(p.get("ok"), "not judged")
                + (" (stopped early)" if p.get("stopped_early") else ""),
                _server_cell(p),
            ]
        )
    head = ["rate", "sent", "answers", "p50 ms", "p99 ms", "errors", "verdict", "server (ms)"]
    search = doc.get("search", {})
    how = (
        f"Each probe: {search.get('warmup_s', 0):g}s warm-up, then {search.get('probe_s', 0):g}s "
        f"measured at a constant rate (open loop; latency from the intended send time). "
        f"Rates tried between {format_rate(search.get('min_rate', 0))} and "
        f"{format_rate(search.get('max_rate', 0))}."
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>Fermion capacity: {escape(slo)}</title><style>{CSS}</style></head>
<body data-charts="0">
<h1>Capacity for {escape(slo)}</h1>
<p class="tiles"><span class="tile"><b id="capacity">{escape(answer)}</b></span></p>
{render_settings(doc.get("config", {}))}
<p class="sub">{escape(how)}</p>
<div class="charts">{chart("chart-capacity", _CAPTION)}</div>
<h2>Probes</h2>
{table(head, rows, "no probe ran")}
{embed_json("fermion-data", doc)}
{embed_json("fermion-charts", capacity_chart_data(doc))}
<script>{REPORT_JS}</script>
</body></html>
"""
