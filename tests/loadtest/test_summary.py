"""The summary of a run: throughput, percentiles, per-version share, errors, timeline, CSV."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from loadtest.summary import summarize, write_history


def test_summary_numbers(raw: dict[str, Any]) -> None:
    s = summarize(raw, {"model": "digits"})
    assert s["requests"] == 1010
    assert s["failures"] == 10
    assert s["error_rate"] == pytest.approx(10 / 1010)
    assert s["duration_s"] == pytest.approx(10.0, abs=0.01)
    assert s["rps"] == pytest.approx(101, rel=0.01)
    lat = s["latency_ms"]
    assert lat["p50"] == pytest.approx(50, abs=1)
    assert lat["p99"] == pytest.approx(99, abs=1)
    assert lat["min"] == 0.5 and lat["max"] == 100
    assert s["versions"]["1"]["requests"] == 600
    assert s["versions"]["2"]["share"] == pytest.approx(0.4)
    assert s["errors"] == [{"status": 503, "message": "queue full: 2048 waiting", "count": 10}]
    assert s["config"] == {"model": "digits"}
    assert s["workers"] == 2


def test_timeline_and_histogram(raw: dict[str, Any]) -> None:
    s = summarize(raw)
    tl = s["timeline"]
    assert [p["t"] for p in tl] == list(range(len(tl)))
    assert sum(p["rps"] for p in tl) == 1010
    assert sum(p["failures"] for p in tl) == 10
    assert all(p["users"] == 8 for p in tl[:10])
    assert sum(p["versions"].get("2", 0) for p in tl) == 400
    assert tl[3]["p99"] >= tl[3]["p50"] > 0
    hist = s["histogram"]
    assert sum(b["count"] for b in hist) == 1010
    assert hist[0]["lo_ms"] == 0.5 and hist[-1]["hi_ms"] == pytest.approx(100)


def test_empty_run_is_summarized_without_numbers() -> None:
    s = summarize({"start": None, "end": None, "seconds": {}})
    assert s["requests"] == 0 and s["rps"] == 0 and s["latency_ms"] == {}
    assert s["timeline"] == [] and s["histogram"] == []


def test_history_csv(raw: dict[str, Any], tmp_path: Path) -> None:
    s = summarize(raw)
    path = tmp_path / "history.csv"
    write_history(s, path)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(s["timeline"])
    assert list(rows[0])[:5] == [
        "timestamp",
        "elapsed_s",
        "users",
        "requests_per_s",
        "failures_per_s",
    ]
    assert sum(int(r["requests_per_s"]) for r in rows) == 1010
    assert sum(int(r["v1_per_s"]) for r in rows) == 600
    assert int(rows[1]["timestamp"]) - int(rows[0]["timestamp"]) == 1
