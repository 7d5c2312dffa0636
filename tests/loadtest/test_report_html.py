"""The HTML report: self-contained, and its charts really draw in a browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from loadtest.report_html import render_html
from loadtest.slo import evaluate, parse_slos
from loadtest.summary import summarize

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def report(raw: dict[str, Any], tmp_path: Path) -> Path:
    summary = summarize(raw, {"model": "digits", "url": "http://127.0.0.1:8000", "users": 8})
    summary["slo"] = [r.to_dict() for r in evaluate(parse_slos("p99<50ms,errors<2%"), summary)]
    path = tmp_path / "report.html"
    path.write_text(render_html(summary))
    return path


def rendered_dom(page: Path, tmp_path: Path) -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium): charts not rendered")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    done = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def figure(dom: str, chart: str) -> str:
    m = re.search(rf'<figure[^>]*id="{chart}"[^>]*>.*?</figure>', dom, re.S)
    assert m is not None, f"{chart} missing from the rendered page"
    return m.group(0)


def points(fig: str) -> int:
    m = re.search(r'data-points="(\d+)"', fig)
    assert m is not None, "chart was not drawn"
    return int(m.group(1))


def test_page_is_self_contained(raw: dict[str, Any], tmp_path: Path) -> None:
    html = report(raw, tmp_path).read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(" not in html
    assert "MISSED" in html and "503" in html and "queue full: 2048 waiting" in html


def test_charts_draw_in_a_browser(raw: dict[str, Any], tmp_path: Path) -> None:
    summary = summarize(raw)
    dom = rendered_dom(report(raw, tmp_path), tmp_path)
    assert re.search(r'<body[^>]*data-charts="5"', dom), "the page script did not finish"
    seconds = len(summary["timeline"])
    throughput = figure(dom, "chart-throughput")
    # requests/s, failures/s, one line per version (two here) and users: a point a second each
    assert points(throughput) == 5 * seconds
    assert throughput.count("<circle") == 5 * seconds
    assert 'data-series="v2/s"' in throughput
    latency = figure(dom, "chart-latency")
    assert points(latency) == 3 * seconds and latency.count("<path") == 3
    histogram = figure(dom, "chart-histogram")
    bars = sum(1 for b in summary["histogram"] if b["count"])
    assert points(histogram) == bars > 5
    assert histogram.count('class="bar"') == bars
    versions = figure(dom, "chart-versions")
    assert points(versions) == 2 and "60.0%" in versions and "40.0%" in versions
    errors = figure(dom, "chart-errors")
    assert points(errors) == seconds


def test_an_empty_run_still_renders(tmp_path: Path) -> None:
    dom = rendered_dom(report({"start": None, "end": None, "seconds": {}}, tmp_path), tmp_path)
    assert re.search(r'<body[^>]*data-charts="5"', dom)
    assert points(figure(dom, "chart-latency")) == 0
    assert "no data" in figure(dom, "chart-histogram")


def test_server_side_and_generator_panels_draw_beside_the_client(
    raw: dict[str, Any], tmp_path: Path
) -> None:
    from loadtest.report_sections import server_verdicts
    from loadtest.server_metrics import Snapshot, breakdown, parse_samples
    from tests.loadtest.test_server_metrics import exposition

    config = {"mode": "open loop", "model": "digits", "rate": "100/s for 10s", "workers": 2}
    summary = summarize(raw, config)
    summary["server"] = breakdown(
        [Snapshot("g1", parse_samples(exposition(0, 0, 0, 0, 0)))],
        [Snapshot("g1", parse_samples(exposition(600, 30, 150, 4, 2)))],
    )
    summary["generator"] = {
        **dict.fromkeys(("scheduled", "sent"), 1000),
        **{"late": 40, "late_ms": 10, "target_rate": 100.0, "achieved_rate": 100.0},
        "lag_ms": {"p50": 0.2, "p99": 35.0, "max": 60.0},
    }
    page = tmp_path / "report.html"
    page.write_text(render_html(summary))
    html = page.read_text()
    assert "rate</td><td>100/s for 10s" in html and "workers</td><td>2" in html
    assert "near its limit" in html  # 40 of 1000 requests left late
    assert server_verdicts(summary["server"])[0] in html.replace("&#x27;", "'")
    assert "queue_full" in html and "shed" in html
    dom = rendered_dom(page, tmp_path)
    assert re.search(r'<body[^>]*data-charts="7"', dom), "the page script did not finish"
    # v1: the client's p50 and p99 only (the gateway reported no v1); v2: all six bars
    assert points(figure(dom, "chart-server")) == 2 + 6
    assert points(figure(dom, "chart-batch")) == 1  # every batch had 4 rows


def test_the_capacity_page_draws_latency_by_rate(tmp_path: Path) -> None:
    from loadtest.capacity_report import render_capacity_html

    probes = [
        {"rate": r, "ok": ok, "requests": 100, "latency_ms": {"p50": p50, "p99": p99}}
        for r, ok, p50, p99 in ((100, True, 3, 8), (200, True, 4, 12), (400, False, 90, 300))
    ]
    doc = {"slo": "p99<50ms,errors<0.1%", "capacity": 200, "ceiling": 400, "precision": 0.05}
    page = tmp_path / "capacity.html"
    page.write_text(render_capacity_html({**doc, "reason": "found", "probes": probes}))
    dom = rendered_dom(page, tmp_path)
    assert re.search(r'<body[^>]*data-charts="1"', dom)
    chart = figure(dom, "chart-capacity")
    assert points(chart) == 3 + 3 + 2  # p50 and p99 at each rate, the objective's line
    assert 'data-series="p99&lt;50ms"' in chart or 'data-series="p99<50ms"' in chart
    assert "200/s meets p99&lt;50ms,errors&lt;0.1%; 400/s misses it" in dom
