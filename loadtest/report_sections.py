"""Report sections beyond the client's numbers: the settings of the run, the load
generator's own figures, and the gateways' side (queue vs compute, batches, rejections,
shed shadow copies) beside the client's latency."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

from loadtest.html_parts import chart, fmt_ms, table

__all__ = [
    "SERVER_CHARTS",
    "generator_warning",
    "match_server_row",
    "render_generator",
    "render_server",
    "render_settings",
    "server_chart_data",
    "server_verdicts",
]

#: The server-side charts (id, caption), drawn by the page's script.
SERVER_CHARTS = (
    ("chart-server", "Client latency vs gateway queue and compute time, per version (ms)"),
    ("chart-batch", "Batch sizes computed (rows per batch), per version"),
)


def render_settings(config: Mapping[str, Any]) -> str:
    """Every setting of the run as a small two-column table."""
    skip = {"url", "binary"}
    rows = []
    for key, value in config.items():
        if key in skip or value in (None, ""):
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        rows.append(f"<tr><td>{escape(key)}</td><td>{escape(shown)}</td></tr>")
    return f'<table class="settings">{"".join(rows)}</table>'


def generator_warning(generator: Mapping[str, Any] | None) -> str | None:
    """Why the generator's figures cannot be trusted as the server's, if they cannot."""
    if not generator or not generator.get("sent"):
        return None
    target = float(generator.get("target_rate") or 0.0)
    achieved = float(generator.get("achieved_rate") or 0.0)
    late = int(generator.get("late", 0))
    sent = int(generator["sent"])
    if target and achieved < 0.99 * target:
        return (
            f"the load generator sent {achieved:.1f}/s of the {target:.1f}/s planned: "
            f"it could not keep up (add --workers); latencies include its delay"
        )
    if late > 0.01 * sent:
        return (
            f"{late} of {sent} requests left more than {generator.get('late_ms', 10):g}ms "
            f"after their time: the load generator is near its limit (add --workers)"
        )
    return None


def render_generator(generator: Mapping[str, Any] | None) -> str:
    """The generator's own figures (open loop, replay): what it sent, and how late."""
    if not generator:
        return ""
    lag = generator.get("lag_ms", {})
    rows = [
        [
            str(generator.get("scheduled", 0)),
            str(generator.get("sent", 0)),
            f"{float(generator.get('target_rate') or 0):.1f}/s",
            f"{float(generator.get('achieved_rate') or 0):.1f}/s",
            fmt_ms(lag.get("p50")),
            fmt_ms(lag.get("p99")),
            fmt_ms(lag.get("max")),
            str(generator.get("late", 0)),
        ]
    ]
    head = ["scheduled", "sent", "planned", "achieved", "lag p50", "lag p99", "lag max", "late"]
    warning = generator_warning(generator)
    note = f'<p class="warn">{escape(warning)}</p>' if warning else ""
    return (
        "<h2>Load generator</h2>"
        "<p>Open loop: each request's latency runs from its intended send time; lag is how "
        "late the generator sent it.</p>" + note + table(head, rows, "nothing sent")
    )


def match_server_row(
    server: Mapping[str, Any] | None, model: str | None, version: str
) -> Mapping[str, Any] | None:
    """The server's row for the client's ``version`` of ``model`` (by version alone when
    the model's name differs, e.g. a route's public name)."""
    rows = list((server or {}).get("versions", {}).values())
    exact = [r for r in rows if r.get("version") == version and r.get("model") == model]
    loose = [r for r in rows if r.get("version") == version]
    found: Mapping[str, Any] | None = (exact or loose or [None])[0]
    return found


def server_verdicts(server: Mapping[str, Any] | None) -> list[str]:
    """One sentence per version: whether queueing or compute took the time."""
    out = []
    for name, row in (server or {}).get("versions", {}).items():
        q, c = row["queue_ms"].get("p99"), row["compute_ms"].get("p99")
        if row.get("cause") == "queueing":
            out.append(
                f"{name}: queueing dominated (queue p99 {fmt_ms(q)}ms vs compute p99 "
                f"{fmt_ms(c)}ms): more replicas or batching, not a faster model"
            )
        elif row.get("cause") == "compute":
            out.append(
                f"{name}: compute dominated (compute p99 {fmt_ms(c)}ms vs queue p99 "
                f"{fmt_ms(q)}ms): the model itself is the time"
            )
    return out


def _pct(d: Mapping[str, Any], key: str) -> str:
    value = fmt_ms(d.get(key))
    return f"&gt;{value}" if key in d.get("above", []) else value


def render_server(summary: Mapping[str, Any]) -> str:
    """The gateways' side of the run, beside the client's view."""
    server = summary.get("server")
    if server is None:
        return ""
    gateways = server.get("gateways", [])
    scraped = "; ".join(
        escape(g["url"]) + ("" if g["ok"] else f" (unavailable: {escape(str(g['error']))})")
        for g in gateways
    )
    config = summary.get("config", {})
    rows = []
    for version, client in summary.get("versions", {}).items():
        row = match_server_row(server, config.get("model"), version)
        rows.append((f"v{version}", client, row))
    seen = {id(r) for _, _, r in rows if r is not None}
    rows += [(name, None, r) for name, r in server.get("versions", {}).items() if id(r) not in seen]
    cells = []
    for name, client, row in rows:
        lat = (client or {}).get("latency_ms", {})
        q = (row or {}).get("queue_ms", {})
        c = (row or {}).get("compute_ms", {})
        b = (row or {}).get("batch_size", {})
        cells.append(
            [
                escape(name),
                str((client or {}).get("requests", "-")),
                fmt_ms(lat.get("p50")),
                fmt_ms(lat.get("p99")),
                str((row or {}).get("requests", "-")),
                _pct(q, "p50"),
                _pct(q, "p99"),
                _pct(c, "p50"),
                _pct(c, "p99"),
                "-" if b.get("mean") is None else f"{b['mean']:.3g}",
                escape(str((row or {}).get("cause") or "-")),
            ]
        )
    head = [
        "version",
        "client requests",
        "client p50",
        "client p99",
        "server requests",
        "queue p50",
        "queue p99",
        "compute p50",
        "compute p99",
        "mean batch",
        "time went to",
    ]
    rejected = [
        [escape(r["model"] or "(none)"), escape(r["reason"]), str(r["count"])]
        for r in server.get("rejected", [])
    ]
    shadow = [
        [
            escape(f"{r['model']} v{r['primary']} -> v{r['shadow']}"),
            escape(r["outcome"]),
            str(r["count"]),
        ]
        for r in server.get("shadow", [])
    ]
    verdicts = "".join(f"<li>{escape(v)}</li>" for v in server_verdicts(server))
    charts = "".join(chart(cid, cap) for cid, cap in SERVER_CHARTS)
    return f"""<h2>Server side (the gateways' /metrics, during the run)</h2>
<p class="sub">Scraped before and after the run: {scraped or "none"}. Server figures count
every request the gateways served in that time; latency in ms (client: from the intended
send time; queue: waiting for a batch; compute: per batch).</p>
{f"<ul>{verdicts}</ul>" if verdicts else ""}
{table(head, cells, "no model version reported queue or compute time")}
<div class="charts">{charts}</div>
<h2>Rejected by the gateways</h2>
{table(["model", "reason", "count"], rejected, "none")}
<h2>Shadow copies</h2>
{table(["pair", "outcome", "count"], shadow, "none mirrored")}
<p class="sub">shed: a copy not mirrored, to protect the primary's latency.</p>
"""


def server_chart_data(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What the server charts draw: per version, grouped bars (name, value)."""
    server = summary.get("server") or {}
    config = summary.get("config", {})
    latency, batches = [], []
    names = {id(r): n for n, r in server.get("versions", {}).items()}
    for version, client in summary.get("versions", {}).items():
        row = match_server_row(server, config.get("model"), version) or {}
        lat = client.get("latency_ms", {})
        q, c = row.get("queue_ms", {}), row.get("compute_ms", {})
        latency.append(
            {
                "name": f"v{version}",
                "bars": [
                    {"name": "client p50", "value": lat.get("p50")},
                    {"name": "client p99", "value": lat.get("p99")},
                    {"name": "queue p50", "value": q.get("p50")},
                    {"name": "queue p99", "value": q.get("p99")},
                    {"name": "compute p50", "value": c.get("p50")},
                    {"name": "compute p99", "value": c.get("p99")},
                ],
            }
        )
    for row in server.get("versions", {}).values():
        buckets = row.get("batch_size", {}).get("buckets", [])
        batches.append(
            {
                "name": names[id(row)],
                "bars": [
                    {
                        "name": "more" if b["le"] is None else f"<={b['le']:g}",
                        "value": b["count"],
                    }
                    for b in buckets
                    if b["count"]
                ],
            }
        )
    return {"server": latency, "batch": batches}
