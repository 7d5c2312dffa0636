"""Payload capture on the real gateway, and ``fermion loadtest replay`` of what it wrote:
same requests, same order, same spacing (scaled by --speed); a full disk fails no request."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from model_store.store import ModelStore
from tests.helpers.inprocess import digits_body
from tests.helpers.servers import REPO_ROOT, RunningServer, start_server, stop_server

pytestmark = pytest.mark.e2e

INFER = "/v2/models/digits/versions/2/infer"
#: Gaps between the original requests (ms): replayed at 2x, each within TOLERANCE_MS of half.
GAPS_MS = (30, 120, 60, 200, 40, 90, 150, 50, 100, 70, 180)
#: The stated tolerance of a replayed gap (README, "Replay").
TOLERANCE_MS = 15.0


def capturing(store: ModelStore, tmp: Path, folder: Path) -> RunningServer:
    config = f"capture:\n  percent: 100\n  dir: {folder}\n"
    return start_server(store.root, tmp, config)


def captured(folder: Path, at_least: int) -> list[dict[str, Any]]:
    """The records in ``folder`` once there are ``at_least`` (the writer is asynchronous).

    A read can land while the writer's thread is part way through a record, so only
    lines that end in a newline count: the text after the last one is still being written.
    """
    deadline = time.monotonic() + 10
    while True:
        lines = [
            json.loads(line)
            for file in folder.glob("capture-*.jsonl")
            for line in file.read_text().split("\n")[:-1]
            if line
        ]
        if len(lines) >= at_least or time.monotonic() > deadline:
            return sorted(lines, key=lambda r: r["ts"])
        time.sleep(0.05)


def capture_counts(server: RunningServer) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    prefix = "fermion_capture_records_total{outcome="
    return {
        line[len(prefix) + 1 :].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


@pytest.fixture()
def folder(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "capture"
    path.mkdir()
    yield path


def test_replay_reproduces_count_order_and_spacing(
    demo_store: ModelStore, tmp_path: Path, folder: Path
) -> None:
    server = capturing(demo_store, tmp_path, folder)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for i, gap in enumerate((0, *GAPS_MS)):
                time.sleep(gap / 1000)
                headers = {"x-request-id": f"orig-{i}", "authorization": "Bearer not-kept"}
                assert client.post(INFER, json=digits_body(), headers=headers).status_code == 200
        originals = captured(folder, len(GAPS_MS) + 1)
        capture_file = tmp_path / "yesterday.jsonl"
        capture_file.write_text("".join(json.dumps(r) + "\n" for r in originals))
        out = tmp_path / "report"
        replay = ["loadtest", "replay", str(capture_file), "--url", server.url, "--speed", "2x"]
        done = subprocess.run(
            [sys.executable, "-m", "serving.cli", *replay, "--out", str(out)],
            cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        replayed = captured(folder, 2 * len(originals))[len(originals) :]
    finally:
        stop_server(server)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == len(originals) and summary["failures"] == 0
    assert summary["config"]["mode"] == "replay" and summary["config"]["speed"] == 2.0
    assert [r["request_id"] for r in replayed] == [f"orig-{i}" for i in range(len(originals))]
    assert all(r["body"] == o["body"] for r, o in zip(replayed, originals, strict=True))
    assert all("authorization" not in dict(r["headers"]) for r in originals + replayed)
    original_gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(originals)]
    replayed_gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(replayed)]
    errors_ms = [abs(r - o / 2) * 1000 for o, r in zip(original_gaps, replayed_gaps, strict=True)]
    # How far this host's own timing strayed in the same run (the test's sleeps, as the
    # gateway saw them) widens the tolerance: a loaded 2-core host delays both alike.
    jitter_ms = max(abs(o * 1000 - g) for o, g in zip(original_gaps, GAPS_MS, strict=True))
    assert max(errors_ms) <= TOLERANCE_MS + 2 * jitter_ms, (errors_ms, jitter_ms)


def test_capture_never_fails_a_request_when_its_disk_is_full(
    demo_store: ModelStore, tmp_path: Path, folder: Path
) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (a device on which every write fails: no space left)")
    server = capturing(demo_store, tmp_path, folder)
    try:
        # The gateway's first capture file is a device whose disk is always full.
        (folder / f"capture-{server.process.pid}-000001.jsonl").symlink_to("/dev/full")
        with httpx.Client(base_url=server.url, timeout=10) as client:
            answers = [client.post(INFER, json=digits_body()) for _ in range(30)]
        assert [a.status_code for a in answers] == [200] * 30
        assert len({json.dumps(a.json()["outputs"]) for a in answers}) == 1
        deadline = time.monotonic() + 10
        while capture_counts(server).get("failed", 0) < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        counts = capture_counts(server)
        assert counts["failed"] == 30 and counts["written"] == 0
        assert "capture: cannot write" in server.log() and "No space left" in server.log()
    finally:
        stop_server(server)
