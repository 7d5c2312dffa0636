"""SIGTERM drains: readiness turns 503 at once, the listener keeps serving for
``server.drain_s``, requests in flight finish, and the process exits 0."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model_store.store import ModelStore
from tests.helpers.ab_models import MODEL, build_ab_store
from tests.helpers.raw_http import exchange, start_on_port_zero
from tests.helpers.servers import RunningServer, stop_server

pytestmark = pytest.mark.e2e

_DRAIN_S = 2.0
#: How long after readiness turns 503 the (simulated) load balancer still sends.
_LB_DELAY_S = 0.5


@pytest.fixture(scope="module")
def ab_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return build_ab_store(tmp_path_factory.getbasetemp() / "ab-store")


def _body(spin: float = 0.0) -> dict[str, object]:
    x = np.ones((1, 4), np.float32)
    x[:, 3] = spin
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x[0].tolist()}]}


def _inflight(server: RunningServer) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fermion_inflight_requests" and sample.labels == {"model": MODEL}:
                return sample.value
    return 0.0


def _ready_status(port: int) -> int:
    """Readiness on a new connection; 0 when the connection is refused."""
    request = b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    return exchange(port, request, 2.0)[0]


@pytest.fixture
def draining(ab_store: ModelStore, tmp_path: Path) -> Iterator[RunningServer]:
    config = f"server:\n  drain_s: {_DRAIN_S}\n  shutdown_grace_s: 10\n"
    server = start_on_port_zero(ab_store.root, tmp_path, config)
    yield server
    stop_server(server)


def test_sigterm_drains_with_no_failed_request_and_exits_0(draining: RunningServer) -> None:
    server = draining
    polls: list[tuple[float, int, float]] = []  # (sent, status, answered)
    outcomes: list[tuple[float, int | str]] = []
    out_of_rotation = threading.Event()
    done = threading.Event()

    def poller() -> None:
        while not done.is_set():
            sent = time.monotonic()
            status = _ready_status(server.port)
            polls.append((sent, status, time.monotonic()))
            time.sleep(0.02)

    def client() -> None:
        # A client behind a load balancer: it sends until the balancer stops routing here.
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not out_of_rotation.is_set():
                sent = time.monotonic()
                try:
                    r = http.post(f"/v2/models/{MODEL}/versions/1/infer", json=_body())
                    outcomes.append((sent, r.status_code))
                except httpx.HTTPError as e:
                    outcomes.append((sent, type(e).__name__))

    def slow() -> None:
        r = httpx.post(
            f"{server.url}/v2/models/{MODEL}/versions/4/infer", json=_body(300.0), timeout=30
        )
        outcomes.append((0.0, r.status_code))

    threads = [threading.Thread(target=f) for f in (poller, client, client, client, slow)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    sigterm_at = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    # The load balancer sees readiness 503 and stops routing here a little later.
    while not any(s == 503 for _, s, _ in polls):
        assert time.monotonic() - sigterm_at < 10, "readiness never turned 503"
        time.sleep(0.01)
    time.sleep(_LB_DELAY_S)
    out_of_rotation.set()
    code = server.process.wait(timeout=30)
    done.set()
    for t in threads:
        t.join()

    assert code == 0
    failed = [o for o in outcomes if o[1] != 200]
    assert not failed, failed
    # Probes answered before SIGTERM said ready (one sent just before it may be answered
    # after, by a draining gateway: 503 is right for it).
    before = [s for _, s, answered in polls if answered < sigterm_at]
    assert before and set(before) == {200}
    ready_503 = min(answered for _, s, answered in polls if s == 503)
    refused = [sent for sent, s, _ in polls if s == 0]
    assert refused, "the listener never closed"
    # Readiness said 503 before the listener closed, and the listener stayed open for
    # the drain period: requests sent after readiness turned 503 were still served.
    served_after = sum(1 for t, _ in outcomes if t > sigterm_at)
    print(
        f"SIGTERM +{(ready_503 - sigterm_at) * 1e3:.0f} ms: ready 503; "
        f"+{(min(refused) - sigterm_at) * 1e3:.0f} ms: listener closed; "
        f"{len(outcomes)} requests, {served_after} sent after SIGTERM, all 200; exit {code}"
    )
    assert ready_503 < min(refused)
    assert min(refused) - sigterm_at >= _DRAIN_S
    assert any(t > ready_503 for t, _ in outcomes)
    assert all(s in (200, 503, 0) for _, s, _ in polls)


def test_a_second_sigterm_ends_the_drain_at_once(ab_store: ModelStore, tmp_path: Path) -> None:
    server = start_on_port_zero(ab_store.root, tmp_path, "server:\n  drain_s: 60\n")
    try:
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _ready_status(server.port) != 503:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        second = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        # Nowhere near the 60 s drain: the second signal ended it.
        assert time.monotonic() - second < 30
    finally:
        stop_server(server)


def test_requests_past_the_grace_period_are_cancelled_and_the_exit_says_so(
    ab_store: ModelStore, tmp_path: Path
) -> None:
    config = "server:\n  drain_s: 0\n  shutdown_grace_s: 0.2\n"
    server = start_on_port_zero(ab_store.root, tmp_path, config)
    answers: list[int | str] = []

    def slow() -> None:
        try:
            r = httpx.post(
                f"{server.url}/v2/models/{MODEL}/versions/4/infer",
                json=_body(1000.0),  # about 3 s: far past the grace period
                timeout=30,
            )
            answers.append(r.status_code)
        except httpx.HTTPError as e:
            answers.append(type(e).__name__)

    try:
        thread = threading.Thread(target=slow)
        thread.start()
        deadline = time.monotonic() + 10
        while _inflight(server) != 1:  # the slow request is being computed
            assert time.monotonic() < deadline, "the slow request never started"
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 1
        thread.join()
        assert answers and answers != [200]
        assert "cancelling 1 request(s) still running after the grace period" in server.log()
    finally:
        stop_server(server)
