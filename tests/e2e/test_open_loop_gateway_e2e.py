"""Open-loop runs against real gateways: counts that agree with the servers', the servers'
side of the report (queue vs compute, batches) read from every gateway of a fleet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from model_store.store import ModelStore
from tests.e2e.conftest import CONFIG
from tests.helpers.servers import REPO_ROOT, RunningServer, start_server, stop_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def second(
    demo_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """Another gateway on the same store: with ``server``, a fleet of two."""
    running = start_server(demo_store.root, tmp_path_factory.mktemp("second"), CONFIG)
    yield running
    stop_server(running)


def served(server: RunningServer) -> dict[str, int]:
    stats = httpx.get(f"{server.url}/v2/models/digits/stats", timeout=10).json()
    return {
        row["version"]: row["inference_stats"]["success"]["count"] for row in stats["model_stats"]
    }


def loadtest(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    command = [sys.executable, "-m", "serving.cli", "loadtest", "--model", "digits"]
    done = subprocess.run(
        [*command, "--out", str(out), *args],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads((out / "summary.json").read_text())


def test_open_loop_workers_share_the_rate_and_the_server_side_matches(
    server: RunningServer, tmp_path: Path
) -> None:
    before = served(server)
    done, summary = loadtest(
        tmp_path / "r",
        *("--url", server.url, "--rate", "100/s", "--duration", "2s", "--workers", "2"),
        *("--model-version", "1", "--binary", "--slo", "errors<1%"),
    )
    sent = served(server)["1"] - before.get("1", 0) - 1  # one request checked the test first
    assert summary["check"] == {"status": 200, "version": "1"}
    assert summary["requests"] == sent == 200 and summary["failures"] == 0
    assert summary["workers"] == 2
    generator = summary["generator"]
    assert generator["scheduled"] == generator["sent"] == 200
    config = summary["config"]
    assert config["mode"] == "open loop" and config["rate"] == "100/s for 2s"
    assert config["encoding"] == "binary" and config["route"] == "version 1"
    assert config["workers"] == 2 and config["protocol"] == "http"
    row = summary["server"]["versions"]["digits v1"]
    assert row["requests"] == sent  # the gateway's queue histogram counted each request
    assert sum(b["count"] for b in row["batch_size"]["buckets"]) == row["batches"] >= 1
    assert row["queue_ms"]["p50"] is not None and row["compute_ms"]["p99"] > 0
    assert row["cause"] in ("queueing", "compute")
    assert "server digits v1: 200 requests" in done.stdout


def test_a_fleet_is_loaded_round_robin_and_every_gateway_is_read(
    server: RunningServer, second: RunningServer, tmp_path: Path
) -> None:
    before = [served(server), served(second)]
    _, summary = loadtest(
        tmp_path / "r",
        *("--url", server.url, "--url", second.url, "--rate", "100/s", "--duration", "1s"),
    )
    counts = [
        served(s).get("2", 0) - b.get("2", 0) for s, b in zip((server, second), before, strict=True)
    ]
    assert counts == [51, 50]  # the first gateway also answered the check before the load
    gateways = summary["server"]["gateways"]
    assert [g["url"] for g in gateways] == [f"{server.url}/metrics", f"{second.url}/metrics"]
    assert all(g["ok"] for g in gateways)
    assert summary["server"]["versions"]["digits v2"]["requests"] == 100  # check not included
    assert summary["config"]["urls"] == [server.url, second.url]
