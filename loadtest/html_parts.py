"""Pieces shared by the report pages: the style sheet, tables, figure tiles and numbers."""

from __future__ import annotations

from html import escape
from typing import Any, Final

from loadtest.summary import number

__all__ = ["CSS", "chart", "fmt_ms", "table", "tile"]

CSS: Final = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;
max-width:1100px;padding:0 16px;color:#111827;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.sub{color:#6b7280;margin:0 0 16px}
.settings{font-size:12px;color:#374151}.settings td{padding:1px 12px 1px 0;border:0;text-align:left}
.tiles{display:flex;flex-wrap:wrap;gap:12px}
.tile{border:1px solid #e5e7eb;border-radius:8px;padding:10px 14px;min-width:120px}
.tile b{display:block;font-size:20px}.tile span{color:#6b7280;font-size:12px}
table{border-collapse:collapse;margin:4px 0}td,th{border-bottom:1px solid #e5e7eb;
padding:4px 12px;text-align:right}th:first-child,td:first-child{text-align:left}
.ok{color:#15803d;font-weight:600}.missed{color:#b91c1c;font-weight:600}
.warn{background:#fef3c7;border:1px solid #f59e0b;border-radius:6px;padding:6px 10px}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:16px}
figure.chart{margin:0;border:1px solid #e5e7eb;border-radius:8px;padding:8px}
figcaption{font-weight:600;margin-bottom:4px}svg.plot{width:100%;height:auto}
.grid{stroke:#e5e7eb}.tick{font-size:11px;fill:#6b7280}.legend{font-size:12px;fill:#374151}
.empty{fill:#9ca3af;font-size:14px}
"""


def fmt_ms(value: Any) -> str:
    """Milliseconds to three significant digits, ``-`` when missing."""
    return "-" if value is None else number(value)


def tile(label: str, value: str) -> str:
    """A big figure with its label."""
    return f'<div class="tile"><b>{escape(value)}</b><span>{escape(label)}</span></div>'


def table(head: list[str], rows: list[list[str]], empty: str) -> str:
    """A table of already escaped cells (``empty`` as a paragraph when no rows)."""
    if not rows:
        return f"<p>{escape(empty)}</p>"
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def chart(chart_id: str, caption: str) -> str:
    """An empty figure the page's script draws into."""
    return (
        f'<figure class="chart" id="{chart_id}"><figcaption>{escape(caption)}</figcaption></figure>'
    )
