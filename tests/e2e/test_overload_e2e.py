"""Overload against the real server: what a client abandons is never computed."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model_store.store import ModelStore
from tests.helpers.ab_models import MODEL, build_ab_store
from tests.helpers.open_loop import http_request
from tests.helpers.raw_http import start_on_port_zero, wait_until
from tests.helpers.servers import RunningServer, stop_server

pytestmark = pytest.mark.e2e

_V4 = f"/v2/models/{MODEL}/versions/4"  # spins ~1 s on x[:, 3] = 300


@pytest.fixture(scope="module")
def ab_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return build_ab_store(tmp_path_factory.getbasetemp() / "ab-store")


@pytest.fixture(scope="module")
def gateway(
    ab_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    config = f"models:\n  {MODEL}:\n    batching: {{max_batch_size: 1}}\n"
    server = start_on_port_zero(ab_store.root, tmp_path_factory.mktemp("overload"), config)
    yield server
    stop_server(server)


def _body(spin: float) -> bytes:
    x = np.ones((1, 4), np.float32)
    x[:, 3] = spin
    tensor = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x[0].tolist()}
    return orjson.dumps({"inputs": [tensor]})


def _stats(server: RunningServer) -> tuple[int, int]:
    """(rows computed, requests queued) of version 4."""
    stats = httpx.get(f"{server.url}{_V4}/stats").json()["model_stats"][0]
    return stats["inference_count"], stats["queue_depth"]


def _inflight(server: RunningServer) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for sample in family.samples:
            if sample.name == "fermion_inflight_requests" and sample.labels == {"model": MODEL}:
                return sample.value
    return 0.0


def test_a_queued_request_whose_client_left_is_never_computed(
    gateway: RunningServer, tmp_path: Path
) -> None:
    computed_before, _ = _stats(gateway)
    slow: list[int] = []
    runner = threading.Thread(
        target=lambda: slow.append(
            httpx.post(f"{gateway.url}{_V4}/infer", content=_body(300.0), timeout=30).status_code
        )
    )
    runner.start()
    wait_until(
        lambda: _inflight(gateway) == 1 and _stats(gateway)[1] == 0, 10, "the slow request runs"
    )
    request = http_request(f"{_V4}/infer", _body(0.0), {"Content-Type": "application/json"})
    abandoned = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(20)]
    for sock in abandoned:
        sock.sendall(request)
    wait_until(lambda: _stats(gateway)[1] == 20, 10, "the 20 requests queue behind the slow one")
    for sock in abandoned:
        sock.close()
    # They leave the queue as soon as their clients have gone ...
    wait_until(lambda: _stats(gateway)[1] == 0, 10, "the abandoned requests leave the queue")
    assert runner.is_alive(), "the slow request ended first: the test proves nothing"
    runner.join()
    assert slow == [200]
    # ... and only the slow request was ever computed.
    assert _stats(gateway)[0] - computed_before == 1
    assert "Exception in ASGI application" not in gateway.log()
