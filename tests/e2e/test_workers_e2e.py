"""``fermion serve --workers 2``: two gateway processes on one port, counted as one host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.ab_models import MODEL
from tests.helpers.fleet import admin, body, build_fleet_store
from tests.helpers.raw_http import exchange
from tests.helpers.redis_server import RedisServer
from tests.helpers.servers import REPO_ROOT, RunningServer, start_server, stop_server

pytestmark = pytest.mark.e2e

_SENT = 240


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _served_200(text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fermion_requests_total{") and f'model="{MODEL}"' in line
        and 'status="200"' in line
    )  # fmt: skip


def test_two_workers_serve_and_count_as_one_host(
    redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    store = build_fleet_store(tmp_path_factory.getbasetemp() / "fleet-store")
    config = f"server: {{workers: 2}}\ncontrol: {{store: {redis.url}, heartbeat_s: 0.2}}\n"
    server: RunningServer = start_server(store.root, tmp_path_factory.mktemp("workers"), config)
    try:
        deadline = time.monotonic() + 60
        while len(gateways := admin(server.url, "GET", "/fleet").json()["gateways"]) < 2:
            assert time.monotonic() < deadline, gateways
            time.sleep(0.1)
        pids = [int(g["pid"]) for g in gateways]
        assert server.process.pid not in pids and len(set(pids)) == 2
        # A worker joins the fleet before its models are loaded: wait until both are ready
        # (each new connection may reach either, so 40 ready answers in a row).
        in_a_row = 0
        while in_a_row < 40:
            ready = httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
            in_a_row = in_a_row + 1 if ready else 0
            assert time.monotonic() < deadline, "the two workers never were both ready"
        idle = [_cpu_s(p) for p in pids]
        time.sleep(1.0)
        idle = [_cpu_s(p) - s for p, s in zip(pids, idle, strict=True)]
        before = [_cpu_s(p) for p in pids]
        x = np.random.default_rng(0).random((1, 4)).astype(np.float32)
        for _ in range(_SENT):  # a new connection each: the kernel spreads them
            r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body(x), timeout=10)
            assert r.status_code == 200, r.text
        busy = [_cpu_s(p) - s for p, s in zip(pids, before, strict=True)]
        # Each worker did real work, far above what it spends idle in the same time.
        assert all(b > max(0.05, 3 * i) for b, i in zip(busy, idle, strict=True)), (busy, idle)
        for _ in range(6):  # whichever worker answers the scrape, the host's total
            scraped = httpx.get(f"{server.url}/metrics", timeout=10).text
            assert _served_200(scraped) == _SENT
            stats = httpx.get(f"{server.url}/v2/models/{MODEL}/stats", timeout=10).json()
            assert sum(row["inference_count"] for row in stats["model_stats"]) == _SENT
    finally:
        stop_server(server)
    assert server.process.returncode == 0, server.log()
    for pid in pids:  # the supervisor stopped its workers
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


_DRAIN_S = 2.0
_READY = b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def test_sigterm_drains_every_worker_for_drain_s_then_exits_0(
    redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The supervisor passes SIGTERM on once: a second one would end the workers' drain at once.
    store = build_fleet_store(tmp_path_factory.getbasetemp() / "fleet-store")
    config = (
        f"server: {{workers: 2, drain_s: {_DRAIN_S}}}\n"
        f"control: {{store: {redis.url}, heartbeat_s: 0.2}}\n"
    )
    server: RunningServer = start_server(store.root, tmp_path_factory.mktemp("drain"), config)
    try:
        deadline = time.monotonic() + 60
        in_a_row = 0
        while in_a_row < 40:  # both workers ready (each new connection may reach either)
            in_a_row = in_a_row + 1 if exchange(server.port, _READY)[0] == 200 else 0
            assert time.monotonic() < deadline, "the two workers never were both ready"
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        seen: list[tuple[float, int]] = []
        while server.process.poll() is None and time.monotonic() < sent + 30:
            seen.append((time.monotonic() - sent, exchange(server.port, _READY, 2.0)[0]))
            time.sleep(0.02)
        exited = time.monotonic() - sent
    finally:
        stop_server(server)
    assert server.process.returncode == 0, server.log()
    # Out of rotation at once, still listening (503, not refused) until the drain ends.
    late = [status for at, status in seen if 0.5 <= at <= _DRAIN_S - 0.3]
    assert late and set(late) == {503}, (seen, server.log())
    assert _DRAIN_S <= exited < _DRAIN_S + 10, (exited, server.log())


def test_workers_without_a_shared_store_refuse_to_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", "--workers", "2", "--port", "0"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "server.workers 2 needs a shared control store" in done.stderr, done.stderr
