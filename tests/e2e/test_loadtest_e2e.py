"""``fermion loadtest`` against the real gateway: short real locust runs, single and
distributed, whose per-version counts agree with the server's own statistics."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from model_store.store import ModelStore
from tests.helpers.servers import REPO_ROOT, RunningServer

pytestmark = pytest.mark.e2e


def served(server: RunningServer) -> dict[str, int]:
    """Successful requests per version, by the server's own count."""
    stats = httpx.get(f"{server.url}/v2/models/digits/stats", timeout=10).json()
    return {
        row["version"]: row["inference_stats"]["success"]["count"] for row in stats["model_stats"]
    }


def fermion(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_loadtest(
    server: RunningServer, store: ModelStore, out: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, int], dict[str, int]]:
    """``fermion loadtest`` of digits against ``server``, and its served counts before and after."""
    before = served(server)
    done = fermion(
        "loadtest",
        *("--url", server.url, "--model", "digits", "--store", str(store.root), "--out", str(out)),
        *args,
    )
    return done, before, served(server)


def check_counts(summary: dict[str, Any], before: dict[str, int], after: dict[str, int]) -> None:
    """The report counts what the server served, but for the one request that checked the
    test before the load (reported apart)."""
    assert summary["failures"] == 0, summary["errors"]
    assert summary["requests"] > 0
    checked = summary["check"]
    assert checked["status"] == 200
    for version in after:
        measured = summary["versions"].get(version, {}).get("requests", 0)
        extra = 1 if checked["version"] == version else 0
        assert measured == after[version] - before.get(version, 0) - extra, (version, summary)


def test_run_reports_what_the_server_served_and_gates_on_slo(
    server: RunningServer, demo_store: ModelStore, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    done, before, after = run_loadtest(
        server,
        demo_store,
        out,
        *("--users", "4", "--duration", "3s", "--slo", "errors<50%,p50<0.001ms"),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "SLO missed: p50<0.001ms: measured" in done.stderr
    assert "SLO met    errors<50%" in done.stdout
    for name in ("summary.json", "history.csv", "report.html", "locust_stats.csv"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    check_counts(summary, before, after)
    assert summary["versions"]["2"]["share"] == 1.0  # latest version answers unpinned requests
    assert summary["config"]["samples"].endswith("samples.npz")
    assert [r["ok"] for r in summary["slo"]] == [True, False]
    with (out / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["requests_per_s"]) for r in rows) == summary["requests"]
    assert max(int(r["users"] or 0) for r in rows) == 4


def test_distributed_run_merges_two_workers_into_one_report(
    server: RunningServer, demo_store: ModelStore, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    done, before, after = run_loadtest(
        server,
        demo_store,
        out,
        *("--model-version", "1", "--users", "4", "--duration", "2s"),
        *("--workers", "2", "--binary", "--slo", "errors<1%"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "workers on other hosts" not in done.stdout  # printed only with --remote-workers
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2  # both workers' measurements reached the master
    check_counts(summary, before, after)
    assert set(summary["versions"]) == {"1"}
    assert (out / "worker-1.log").is_file() and (out / "worker-2.log").is_file()
    assert "report.html" in done.stdout


def test_locustfile_runs_with_plain_locust(server: RunningServer, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            *("-f", str(REPO_ROOT / "loadtest" / "locustfile.py"), "--headless", "--only-summary"),
            *("-H", server.url, "-u", "2", "-r", "2", "-t", "2s", "--model", "digits"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "infer v2" in done.stdout + done.stderr


@pytest.mark.parametrize("mode", [("--users", "2"), ("--rate", "50/s")], ids=["locust", "open"])
def test_a_request_the_model_refuses_fails_the_run_at_once(
    server: RunningServer, tmp_path: Path, mode: tuple[str, str]
) -> None:
    before = served(server)
    done = fermion(
        "loadtest",
        *("--url", server.url, "--model", "digits", *mode, "--duration", "60s"),
        *("--binary", "--batch-size", "100", "--out", str(tmp_path / "report")),
        timeout=30,  # not the 60 s the run asked for
    )  # a batch over the model's max batch size (64): every request would fail
    assert done.returncode == 2, done.stdout + done.stderr
    assert "the gateway refuses the test's requests" in done.stderr
    assert "400" in done.stderr and "max batch size" in done.stderr
    assert served(server) == before
    assert not (tmp_path / "report" / "summary.json").exists()
