"""``fermion loadtest compare`` and the command's refusals (no server needed)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest.compare import compare, format_comparison, load_summary
from loadtest.summary import summarize
from serving.cli import main
from tests.helpers.servers import REPO_ROOT
from tests.loadtest.conftest import raw_run


def write_report(folder: Path, summary: dict[str, Any]) -> Path:
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_compare_shows_deltas_and_verdicts(tmp_path: Path) -> None:
    before = summarize(raw_run(slow=1.0, failures=10))
    after = summarize(raw_run(slow=2.0, failures=0))
    deltas = {d.metric: d for d in compare(before, after)}
    assert deltas["p99 latency"].change == pytest.approx(99)
    assert deltas["p99 latency"].relative == pytest.approx(1.0)
    assert deltas["p99 latency"].better is False
    assert deltas["error rate"].better is True
    assert deltas["v2 share"].better is None
    text = format_comparison(before, after, ("before", "after"))
    line = next(x for x in text.splitlines() if x.startswith("p99 latency"))
    assert line.split() == [
        *("p99", "latency", "99ms", "198ms", "+99ms", "(+100.0%)", "±4.95ms", "WORSE")
    ]
    assert "better/WORSE only beyond the noise column: ±5% of A" in text
    assert "settings differ" not in text


def test_a_change_within_the_noise_is_not_called_better_or_worse() -> None:
    before = summarize(raw_run(slow=1.0, failures=10))
    after = summarize(raw_run(slow=1.03, failures=12))
    deltas = {d.metric: d for d in compare(before, after)}
    assert deltas["p99 latency"].change == pytest.approx(3, abs=0.1)
    assert deltas["p99 latency"].better is None  # 3% < 5%
    assert deltas["error rate"].better is None  # 10 vs 12 failures in 1000: chance
    assert deltas["p99 latency"].threshold >= 0.05 * 99
    strict = {d.metric: d for d in compare(before, after, noise=0.01)}
    assert strict["mean latency"].better is False  # beyond a 1% threshold
    text = format_comparison(before, after)
    line = next(x for x in text.splitlines() if x.startswith("p99 latency"))
    assert line.endswith("~ (noise)")


def test_the_runs_own_spread_raises_the_threshold() -> None:
    steady = summarize(raw_run())
    noisy = summarize(raw_run())
    for i, point in enumerate(noisy["timeline"]):
        point["rps"] = 50 if i % 2 else 150  # same mean, large second-to-second swings
    rps = next(d for d in compare(steady, noisy) if d.metric == "requests/s")
    assert rps.a is not None and rps.threshold > 0.2 * rps.a  # well above the 5% floor


def test_runs_with_different_settings_are_compared_with_a_warning() -> None:
    a = summarize(raw_run(), {"mode": "open loop", "rate": "100/s for 10s", "workers": 0})
    b = summarize(raw_run(), {"mode": "open loop", "rate": "200/s for 10s", "workers": 2})
    text = format_comparison(a, b)
    assert "WARNING: the runs' settings differ" in text
    assert "rate: 100/s for 10s vs 200/s for 10s" in text and "workers: 0 vs 2" in text


def test_compare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_report(tmp_path / "a", summarize(raw_run()))
    b = write_report(tmp_path / "b", summarize(raw_run(slow=0.5)))
    assert main(["loadtest", "compare", str(a), str(b / "summary.json")]) == 0
    out = capsys.readouterr().out
    assert "requests/s" in out and "p99.9 latency" in out and "better" in out
    assert main(["loadtest", "compare", str(a), str(b), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["metric"] for r in rows} >= {"requests/s", "v1 share", "v2 p99 latency"}
    assert load_summary(a)["requests"] == 1010


def test_compare_refuses_what_is_not_a_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["loadtest", "compare", str(tmp_path), str(tmp_path)]) == 2
    assert "no load test report" in capsys.readouterr().err


def test_bad_slo_is_refused_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "--model", "digits", "--slo", "p99<50ms,p99<<3"]) == 2
    assert "invalid SLO 'p99<<3'" in capsys.readouterr().err


def test_unreachable_gateway_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A port held by this bound, never listening, socket: connections to it are refused.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{held.getsockname()[1]}"
        code = main(["loadtest", "--url", url, "--model", "digits", "--out", str(tmp_path / "r")])
    assert code == 2
    assert f"GET {url}/v2/models/digits" in capsys.readouterr().err


def test_serving_never_imports_locust() -> None:
    code = (
        "import sys; from serving.cli import _parser; _parser('serve'); "
        "import serving.http.app; "
        "bad = [m for m in ('locust', 'gevent', 'loadtest.cli') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
