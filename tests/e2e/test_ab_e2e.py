"""A/B rollouts through the real gateway: splits, stickiness, shadows, canaries, restarts."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model_store.store import ModelStore
from serving.config import load_config
from tests.helpers.ab_models import (
    FAIL_AT,
    MODEL,
    build_ab_store,
    expected_logits,
    step_verdicts,
)
from tests.helpers.servers import REPO_ROOT, RunningServer, start_server, stop_server

pytestmark = pytest.mark.e2e

CONFIG = f"""# the A/B test gateway
batching:
  max_queue_size: 4096
routes:
  {MODEL}:
    split: {{'1': 90, '2': 10}}
    sticky: {{header: x-user-id}}
    rollout: {{min_requests: 5, max_p99_ratio: 3.0, p99_slack_ms: 50}}
"""


def _serve(store: Path, config_path: Path) -> RunningServer:
    """``fermion serve --config config_path`` on a free port (the same file across restarts)."""
    return start_server(store, config_path.parent, config_path=config_path)


@dataclass
class _Gateway:
    store: Path
    config_path: Path
    server: RunningServer


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Gateway]:
    store: ModelStore = build_ab_store(tmp_path_factory.getbasetemp() / "ab-store")
    config_path = tmp_path_factory.mktemp("ab-gateway") / "fermion.yaml"
    config_path.write_text(CONFIG)
    gw = _Gateway(store.root, config_path, _serve(store.root, config_path))
    yield gw
    stop_server(gw.server)


def _body(x: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }


def _x(seed: int, rows: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 4)).astype(np.float32)


def _infer(
    client: httpx.Client, url: str, x: np.ndarray, user: str | None = None, path: str = ""
) -> httpx.Response:
    headers = {"x-user-id": user} if user is not None else {}
    return client.post(f"{url}/v2/models/{MODEL}{path}/infer", json=_body(x), headers=headers)


def _admin(url: str, method: str, path: str, body: Any = None) -> Any:
    r = httpx.request(method, f"{url}/admin{path}", json=body, timeout=10)
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


@dataclass
class _Load:
    """Clients sending requests in threads; every answer is recorded."""

    url: str
    make_x: Callable[[int], np.ndarray]
    threads: int = 4
    answers: list[tuple[float, int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self, seed: int) -> None:
        with httpx.Client(timeout=30) as client:
            i = seed
            while not self._stop.is_set():
                sent = time.monotonic()
                r = _infer(client, self.url, self.make_x(i), user=f"user-{i}")
                self.answers.append((sent, r.status_code, r.headers.get("fermion-model-version")))
                i += self.threads

    def __enter__(self) -> _Load:
        self._workers = [
            threading.Thread(target=self._run, args=(s,), daemon=True) for s in range(self.threads)
        ]
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(timeout=30)


def test_split_sticky_pinned_and_the_version_header(gateway: _Gateway) -> None:
    url = gateway.server.url
    with httpx.Client(timeout=10) as client:
        seen = set()
        for i in range(200):
            r = _infer(client, url, _x(i), user=f"user-{i}")
            assert r.status_code == 200, r.text
            version = r.headers["fermion-model-version"]
            assert r.json()["model_version"] == version
            np.testing.assert_allclose(
                r.json()["outputs"][0]["data"],
                expected_logits(int(version), _x(i)).ravel(),
                rtol=1e-5,
                atol=1e-6,
            )
            seen.add(version)
        assert seen == {"1", "2"}
        alice = {
            _infer(client, url, _x(i), user="alice").headers["fermion-model-version"]
            for i in range(30)
        }
        assert len(alice) == 1
        pinned = {
            _infer(client, url, _x(i), path="/versions/2").headers["fermion-model-version"]
            for i in range(30)
        }
        assert pinned == {"2"}
    route = _admin(url, "GET", f"/routes/{MODEL}")
    assert route["shares"] == {"1": 0.9, "2": 0.1}


def test_changing_the_split_under_load_fails_no_request(gateway: _Gateway) -> None:
    url = gateway.server.url
    with _Load(url, _x) as load:
        time.sleep(0.7)
        _admin(url, "PUT", f"/routes/{MODEL}/split", {"split": {"1": 50, "2": 50}})
        time.sleep(0.7)
        _admin(url, "PUT", f"/routes/{MODEL}/split", {"split": {"1": 0, "2": 100}})
        switched = time.monotonic()
        time.sleep(0.7)
    statuses = [s for _, s, _ in load.answers]
    assert len(statuses) > 100 and set(statuses) == {200}, len(statuses)
    # Atomic: every answer came from a version with weight in the split before or after a
    # change (1 and 2), never from the latest version (4) that a route-less moment would pick.
    assert {v for _, _, v in load.answers} <= {"1", "2"}
    after = {v for sent, _, v in load.answers if sent > switched}
    assert after == {"2"}
    assert load_config(gateway.config_path).routes[MODEL].split == {1: 0.0, 2: 100.0}
    assert gateway.config_path.read_text().startswith("batching:")  # rewritten, keys kept
    done = _cli(url, "route", "set", MODEL, "1=90,2=10")
    assert done.returncode == 0 and "v1 90.0%, v2 10.0%" in done.stdout, done.stderr


def _wait_shadows(url: str, pair: str, count: Callable[[dict[str, Any]], int], n: int) -> Any:
    deadline = time.monotonic() + 10
    while True:
        figures = _admin(url, "GET", f"/routes/{MODEL}")["shadow_figures"].get(pair, {})
        if (figures and count(figures) >= n) or time.monotonic() > deadline:
            return figures
        time.sleep(0.05)


def test_a_failing_or_slow_shadow_never_reaches_the_client(gateway: _Gateway) -> None:
    url = gateway.server.url
    # Deep enough that no copy is shed on a slow host: this part counts failures only.
    shadow = {"version": 3, "percent": 100, "max_queue_depth": 64}
    _admin(url, "PUT", f"/routes/{MODEL}", {"split": {"1": 100}, "shadow": shadow})
    bad = np.ones((2, 4), np.float32)
    bad[:, 0] = FAIL_AT + 1  # version 3 fails on these rows
    with httpx.Client(timeout=10) as client:
        for _ in range(20):
            r = _infer(client, url, bad)
            assert r.status_code == 200, r.text
            assert r.headers["fermion-model-version"] == "1"
            np.testing.assert_allclose(
                r.json()["outputs"][0]["data"],
                expected_logits(1, bad).ravel(),
                rtol=1e-5,
                atol=1e-6,
            )
    figures = _wait_shadows(url, "1->3", lambda f: f["errors"], 20)
    assert figures["errors"] == 20 and figures["mirrored"] == 20

    shadow = {"version": 4, "percent": 100, "max_queue_depth": 2}
    _admin(url, "PUT", f"/routes/{MODEL}", {"split": {"1": 100}, "shadow": shadow})
    heavy = np.ones((2, 4), np.float32)
    heavy[:, 3] = 300.0  # version 4 spins a few tenths of a second per batch on these
    latencies = []
    with httpx.Client(timeout=10) as client:
        # The baseline, from this run: one batch of version 4 asked for directly.
        started = time.perf_counter()
        assert _infer(client, url, heavy, path="/versions/4").status_code == 200
        shadow_batch_s = time.perf_counter() - started
        began = time.perf_counter()
        for _ in range(20):
            started = time.perf_counter()
            r = _infer(client, url, heavy)
            latencies.append(time.perf_counter() - started)
            assert r.status_code == 200 and r.headers["fermion-model-version"] == "1"
        elapsed = time.perf_counter() - began
    # No request waited for its shadow copy: none took as long as one shadow batch.
    assert max(latencies) < shadow_batch_s, (latencies, shadow_batch_s)
    figures = _wait_shadows(url, "1->4", lambda f: f["mirrored"] + f["shed"], 20)
    # One batch runs at a time and at most 2 copies wait (they then run as one batch):
    # each batch that ended while the clients sent let 2 more in; the others were shed.
    admitted = 20 - figures["shed"]
    assert figures["shed"] > 0 and admitted <= 3 + 2 * math.ceil(elapsed / shadow_batch_s), (
        figures,
        elapsed,
        shadow_batch_s,
    )
    _admin(
        url,
        "PUT",
        f"/routes/{MODEL}",
        {"split": {"1": 90, "2": 10}, "sticky": {"header": "x-user-id"}},
    )


def _rollout(url: str, *args: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start a rollout (with the CLI, or with ``spec`` through the admin API) and await it."""
    if spec is not None:
        _admin(url, "POST", f"/rollouts/{MODEL}", spec)
    else:
        started = _cli(url, "rollout", "start", MODEL, *args)
        assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = _admin(url, "GET", f"/rollouts/{MODEL}")
        if status["status"] != "running":
            return status  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"rollout still running: {status}")


def test_canary_rolls_back_a_faulty_version_promotes_a_healthy_one_and_survives_a_restart(
    gateway: _Gateway,
) -> None:
    url = gateway.server.url

    def some_bad(i: int) -> np.ndarray:
        x = _x(i)
        if i % 4 == 0:
            x[0, 0] = FAIL_AT + 1  # version 3 fails on a quarter of the requests
        return x

    with _Load(url, some_bad, threads=3):
        spec = {"to": 3, "from": 1, "steps": [25, 100], "interval_s": 0.5}
        faulty = _rollout(url, spec=spec)
    assert faulty["status"] == "rolled_back"
    assert faulty["reason"].startswith("error rate"), faulty
    assert faulty["history"][-1]["candidate"]["errors"] > 0
    assert _admin(url, "GET", f"/routes/{MODEL}")["shares"] == {"1": 1.0, "3": 0.0}

    with _Load(url, _x, threads=3):
        healthy = _rollout(url, "--to", "2", "--steps", "50,100", "--interval", "500ms")
    assert healthy["status"] == "promoted", (healthy["reason"], healthy["history"])
    assert step_verdicts(healthy["history"]) == ["pass", "pass"]
    shown = _cli(url, "rollout", "status", MODEL)
    assert shown.returncode == 0 and "PROMOTED" in shown.stdout, shown.stdout

    stop_server(gateway.server)
    gateway.server = _serve(gateway.store, gateway.config_path)
    url = gateway.server.url
    after = _admin(url, "GET", f"/rollouts/{MODEL}")
    assert after["status"] == "promoted" and after["history"] == healthy["history"]
    assert _admin(url, "GET", f"/routes/{MODEL}")["shares"] == {"1": 0.0, "2": 1.0}
    with httpx.Client(timeout=10) as client:
        assert _infer(client, url, _x(0), user="bob").headers["fermion-model-version"] == "2"
