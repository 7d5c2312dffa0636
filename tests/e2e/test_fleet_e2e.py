"""A fleet: three real gateways on one real Redis act as one.

Routes changed through one gateway are served by all; one gateway drives a rollout,
judged on every gateway's figures, and another carries it on when the driver is
killed; one rate limit for the whole fleet; Redis killed under load fails no request.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers.ab_models import FAIL_AT, MODEL, step_verdicts
from tests.helpers.fleet import LIMITED, Load, admin, build_fleet_store, start_gateways
from tests.helpers.redis_server import RedisServer, start_redis, stop_redis
from tests.helpers.servers import REPO_ROOT, RunningServer, stop_server

pytestmark = pytest.mark.e2e

#: Rollout intervals of these tests; the driver's lease is shorter.
INTERVAL_S = 1.5


def _config(redis_url: str) -> str:
    return f"""
batching: {{max_queue_size: 4096}}
control:
  store: {redis_url}
  sync_interval_s: 0.1
  heartbeat_s: 0.3
  lease_ttl_s: 1.0
  timeout_s: 1.0  # generous: a loaded 2-core host may stall a reply past 0.3 s
limits:
  rate_limits: [{{models: {LIMITED}, rate: 50, burst: 50}}]
routes:
  {MODEL}:
    split: {{'1': 100}}
    rollout: {{min_requests: 5, max_p99_ratio: 3.0, p99_slack_ms: 50}}
"""


@dataclass
class _Fleet:
    redis: RedisServer
    gateways: list[RunningServer]

    @property
    def urls(self) -> list[str]:
        return [g.url for g in self.gateways]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Fleet]:
    store = build_fleet_store(tmp_path_factory.getbasetemp() / "fleet-store")
    tmp = tmp_path_factory.mktemp("fleet")
    running = _Fleet(start_redis(tmp / "redis"), [])
    try:
        running.gateways = start_gateways(store.root, tmp, _config(running.redis.url), 3)
        yield running
    finally:
        for g in running.gateways:
            stop_server(g)
        stop_redis(running.redis)  # the one the Redis test restarted, if it did


def _good(gateway: int, i: int) -> np.ndarray:
    return np.random.default_rng(i).random((1, 4)).astype(np.float32)


def _ok(r: httpx.Response) -> Any:
    assert r.status_code < 300, r.text
    return r.json()


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args, "--url", url],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )


def _wait_rollout(url: str, done: set[str], timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        state: dict[str, Any] = _ok(admin(url, "GET", f"/rollouts/{MODEL}"))
        if state["status"] in done or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def _drivers(url: str) -> dict[str, list[str]]:
    fleet = _ok(admin(url, "GET", "/fleet"))
    return {g["id"]: g["driving"] for g in fleet["gateways"]}


def _wait_drivers(url: str, timeout_s: float = 3.0) -> dict[str, list[str]]:
    """The gateways driving a rollout, once one does (heartbeats say so)."""
    deadline = time.monotonic() + timeout_s
    while True:
        drivers = {gid: d for gid, d in _drivers(url).items() if d}
        if drivers or time.monotonic() > deadline:
            return drivers
        time.sleep(0.05)


def test_a_split_changed_through_one_gateway_is_served_by_all_within_a_second(
    fleet: _Fleet,
) -> None:
    with Load(fleet.urls, _good) as load:
        time.sleep(0.5)
        changed = time.monotonic()
        _ok(admin(fleet.urls[0], "PUT", f"/routes/{MODEL}/split", {"split": {"1": 0, "2": 100}}))
        time.sleep(1.6)
    assert not load.failures, load.failures[:5]
    for g in range(3):
        before = {a.version for a in load.answers if a.gateway == g and a.sent < changed}
        late = [a.version for a in load.answers if a.gateway == g and a.sent > changed + 1.0]
        assert before == {"1"}, (g, before)
        assert late and set(late) == {"2"}, (g, set(late))
    status = _cli(fleet.urls[2], "fleet", "status")
    assert status.returncode == 0, status.stderr
    versions = {g["route_version"] for g in _ok(admin(fleet.urls[1], "GET", "/fleet"))["gateways"]}
    assert len(_ok(admin(fleet.urls[1], "GET", "/fleet"))["gateways"]) == 3
    assert len(versions) == 1, versions
    assert "3 gateway(s)" in status.stdout and status.stdout.count("local") == 3, status.stdout
    # Every gateway wrote the fleet's table back into its own config file.
    for gw in fleet.gateways:
        assert gw.config_path is not None
        config = gw.config_path.read_text()
        assert "'2': 100.0" in config, config
    _ok(admin(fleet.urls[1], "PUT", f"/routes/{MODEL}/split", {"split": {"1": 100}}))


def test_one_driver_judges_the_fleet_figures_and_rolls_back_a_partial_failure(
    fleet: _Fleet,
) -> None:
    """Version 3 fails only on the third gateway's traffic; the driver (the first) sees none
    of it locally, and still rolls it back on the merged figures."""

    def rows(gateway: int, i: int) -> np.ndarray:
        x = _good(gateway, i)
        if gateway == 2:
            x[:, 0] = FAIL_AT + 1
        return x

    with Load(fleet.urls, rows, pause_s=0.01) as load:
        spec = {"to": 3, "from": 1, "steps": [50, 100], "interval_s": INTERVAL_S}
        started = _ok(admin(fleet.urls[0], "POST", f"/rollouts/{MODEL}", spec))
        assert started["status"] == "running"
        second = admin(fleet.urls[1], "POST", f"/rollouts/{MODEL}", spec)
        assert second.status_code == 409, second.text
        locked = admin(fleet.urls[2], "PUT", f"/routes/{MODEL}/split", {"split": {"1": 100}})
        assert locked.status_code == 409, locked.text
        drivers = _wait_drivers(fleet.urls[2])
        assert list(drivers.values()) == [[MODEL]], drivers
        state = _wait_rollout(fleet.urls[1], {"rolled_back", "promoted"})
    assert state["status"] == "rolled_back", state
    assert "error rate" in state["reason"], state["reason"]
    judged = state["history"][-1]
    assert judged["verdict"] == "breach" and judged["candidate"]["errors"] > 0, judged
    assert {a.status for a in load.answers if a.gateway < 2} == {200}
    views = [_cli(url, "rollout", "status", MODEL, "--json").stdout for url in fleet.urls]
    assert views[0] == views[1] == views[2], views


def test_a_fleet_wide_limit_admits_what_one_bucket_would(fleet: _Fleet) -> None:
    """50/s, burst 50, hammered through three gateways for 10 s: 50 + 10 x 50 = 550."""
    with Load(fleet.urls, _good, model=LIMITED, threads_per_gateway=2) as load:
        start = time.monotonic()
        time.sleep(10.3)
    window = [a for a in load.answers if start <= a.sent < start + 10.0]
    admitted = sum(1 for a in window if a.status == 200)
    refused = [a for a in window if a.status == 429]
    assert not load.failures, load.failures[:5]
    assert refused and all(a.retry_after for a in refused)
    assert 495 <= admitted <= 605, (admitted, len(window))
    per_gateway = [sum(1 for a in window if a.status == 200 and a.gateway == g) for g in range(3)]
    assert all(n > 50 for n in per_gateway), per_gateway


def _store_up(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    line = next(s for s in text.splitlines() if s.startswith("fermion_control_store_up "))
    return float(line.split()[1])


def test_redis_killed_under_load_fails_no_request_and_the_fleet_resyncs(
    fleet: _Fleet, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with Load(fleet.urls, _good) as load:
        time.sleep(0.5)
        stop_redis(fleet.redis, kill=True)
        time.sleep(1.0)
        down = admin(fleet.urls[1], "PUT", f"/routes/{MODEL}/split", {"split": {"2": 100}})
        assert down.status_code == 503 and "control store" in down.json()["error"], down.text
        spec = {"to": 2, "from": 1, "steps": [100], "interval_s": INTERVAL_S}
        assert admin(fleet.urls[2], "POST", f"/rollouts/{MODEL}", spec).status_code == 503
        assert [_store_up(url) for url in fleet.urls] == [0.0, 0.0, 0.0]
        time.sleep(0.5)
        # Back, empty (it keeps nothing on disk): the gateways seed it and carry on.
        fleet.redis = start_redis(fleet.redis.workdir, port=fleet.redis.port)
        back = time.monotonic()
        while time.monotonic() - back < 2.0 and 0.0 in [_store_up(url) for url in fleet.urls]:
            time.sleep(0.05)
        resynced = time.monotonic() - back
        assert "clf" in fleet.redis.command("HKEYS", "fermion:routes")
        _ok(admin(fleet.urls[1], "PUT", f"/routes/{MODEL}/split", {"split": {"2": 100}}))
        changed = time.monotonic()
        time.sleep(1.5)
    assert resynced < 2.0, resynced
    assert not load.failures, load.failures[:5]
    assert {a.status for a in load.answers} == {200}
    for g in range(3):
        late = {a.version for a in load.answers if a.gateway == g and a.sent > changed + 1.0}
        assert late == {"2"}, (g, late)
    _ok(admin(fleet.urls[0], "PUT", f"/routes/{MODEL}/split", {"split": {"1": 100}}))


def test_killing_the_driver_mid_rollout_another_gateway_completes_it(fleet: _Fleet) -> None:
    driver, survivors = fleet.gateways[0], fleet.urls[1:]
    with Load(survivors, _good, pause_s=0.005) as load:
        spec = {"to": 2, "from": 1, "steps": [20, 50, 100], "interval_s": INTERVAL_S}
        _ok(admin(driver.url, "POST", f"/rollouts/{MODEL}", spec))
        deadline = time.monotonic() + 30
        while _ok(admin(survivors[0], "GET", f"/rollouts/{MODEL}"))["step_index"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(driver.process.pid, signal.SIGKILL)
        driver.process.wait(timeout=10)
        killed = time.monotonic()
        while not any(_drivers(survivors[0]).values()):
            assert time.monotonic() - killed < 2 * INTERVAL_S, "no gateway took the rollout over"
            time.sleep(0.05)
        state = _wait_rollout(survivors[1], {"promoted", "rolled_back"})
    assert state["status"] == "promoted", state
    assert [h["percent"] for h in state["history"]][-1] == 100
    assert set(step_verdicts(state["history"])) == {"pass"}
    assert {a.status for a in load.answers} == {200}, load.failures[:5]
