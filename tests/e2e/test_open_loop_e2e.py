"""What the open loop measures that a closed loop hides, and the capacity search, against a
server whose timing is known (``tests/helpers/paced_server.py``)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from loadtest.open_runner import EngineJob, JobResult, run_async, run_job
from loadtest.report_sections import generator_warning
from loadtest.summary import summarize
from tests.helpers.paced_server import paced_server
from tests.helpers.servers import REPO_ROOT

pytestmark = pytest.mark.e2e

STALL_MS = 500


def fermion(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def summary_of(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return data


def test_open_loop_p99_shows_a_stall_the_closed_loop_hides(tmp_path: Path) -> None:
    stall = ("--stall-after", "0.5", "--stall-ms", str(STALL_MS))
    common = ("--model", "paced", "--duration", "1.5s")
    with paced_server(*stall) as server:
        opened = fermion(
            "loadtest",
            "--url",
            server.url,
            *common,
            "--rate",
            "200/s",
            "--out",
            str(tmp_path / "o"),
        )
    with paced_server(*stall) as server:
        closed = fermion(
            "loadtest", "--url", server.url, *common, "--users", "2", "--out", str(tmp_path / "c")
        )
    assert opened.returncode == 0, opened.stdout + opened.stderr
    assert closed.returncode == 0, closed.stdout + closed.stderr
    open_lat = summary_of(tmp_path / "o")["latency_ms"]
    closed_lat = summary_of(tmp_path / "c")["latency_ms"]
    # Both runs met the stall (their slowest request waited through it)...
    assert open_lat["max"] >= 0.8 * STALL_MS and closed_lat["max"] >= 0.8 * STALL_MS
    # ...but only the open loop's p99 says so: the closed loop stopped sending meanwhile.
    assert open_lat["p99"] >= 0.8 * STALL_MS
    assert closed_lat["p99"] < 0.2 * STALL_MS
    generator = summary_of(tmp_path / "o")["generator"]
    assert generator["sent"] == generator["scheduled"] == 300
    assert "generator: sent 300 of 300 (200.0/s of 200.0/s planned)" in opened.stdout


def test_capacity_search_finds_a_known_capacity_within_its_precision(tmp_path: Path) -> None:
    capacity, precision = 400.0, 0.1
    out = tmp_path / "capacity"
    with paced_server("--rate", str(capacity)) as server:
        done = fermion(
            *("loadtest", "capacity", "--url", server.url, "--model", "paced"),
            *("--slo", "p99<40ms", "--start-rate", "250/s", "--precision", "10%"),
            *("--warmup", "0.3s", "--probe", "0.7s", "--out", str(out)),
        )
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads((out / "capacity.json").read_text())
    found, ceiling = doc["capacity"], doc["ceiling"]
    assert doc["reason"] == "found", doc["reason"]
    assert ceiling <= found * (1 + precision)
    assert capacity / (1 + precision) <= found <= capacity * (1 + precision), done.stdout
    assert f"capacity: {found:.4g}/s meets p99<40ms,errors<0.1%" in done.stdout
    missed = [p for p in doc["probes"] if p["ok"] is False]
    assert missed and all(p["rate"] > capacity for p in missed)
    assert any(p["stopped_early"] for p in missed)
    assert (out / "capacity.html").is_file()


def _run_with_hog(job: EngineJob, hog_s: float) -> JobResult:
    async def go() -> JobResult:
        async def hog() -> None:
            await asyncio.sleep(0.5)
            time.sleep(hog_s)  # the generator's process gets no CPU for a while

        task = asyncio.create_task(hog())
        result = await run_job(job)
        await task
        return result

    return run_async(go())


def test_a_generator_that_falls_behind_says_so_and_counts_its_delay() -> None:
    with paced_server() as server:
        job = EngineJob([server.url], model="paced", rate="200/s", duration_s=1.5)
        starved = _run_with_hog(job, 0.5)
        normal = _run_with_hog(job, 0.0)
    gen = starved.stats.to_dict()
    warning = generator_warning(gen)
    assert warning is not None and "near its limit" in warning
    # the ~100 requests due while it was starved left late (beyond what a busy host makes
    # late anyway), and their wait is in the latency
    assert starved.stats.late >= normal.stats.late + 50
    assert summarize(starved.measured.to_dict())["latency_ms"]["p99"] >= 300
    assert gen["sent"] == gen["scheduled"] == 300  # late, never dropped
