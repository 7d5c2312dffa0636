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
