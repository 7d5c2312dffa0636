"""Overload against the real server: refusing costs far less than serving, and what a
client abandons is never computed."""

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

from model_store.manifest import TensorSpec
from model_store.store import ArtifactSource, ModelStore
from tests.helpers.ab_models import MODEL, build_ab_store
from tests.helpers.open_loop import closed_loop, http_request, open_loop
from tests.helpers.raw_http import error_of, read_response, start_on_port_zero, wait_until
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
    config = f"models:\n  {MODEL}:\n    batching: {{max_batch_size: 1, max_queue_size: 20}}\n"
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


_WIDE = 4096  # FP32 features per row: about 80 kB of JSON per one-row request


def _wide_model(root: Path) -> ModelStore:
    """``wide``: x FP32 [n, 4096] -> y = sum(x) [n, 1]; decoding its JSON is the work."""
    import onnx
    from onnx import TensorProto, helper

    store = ModelStore(root / "store")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", _WIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = root / "wide.onnx"
    onnx.save(model, str(path))
    store.publish(
        "wide",
        platform="onnxruntime_onnx",
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, _WIDE])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 1])],
        max_batch_size=64,
        artifacts=[ArtifactSource("onnxruntime", path, file="model.onnx")],
    )
    return store


def test_a_request_its_queue_would_shed_is_refused_before_its_body_arrives(
    gateway: RunningServer,
) -> None:
    """With the queue full, a request head alone gets 503 + Retry-After: the gateway does
    not wait for, read or decode a body it would throw away."""
    slow = threading.Thread(
        target=lambda: httpx.post(f"{gateway.url}{_V4}/infer", content=_body(300.0), timeout=30)
    )
    slow.start()
    wait_until(lambda: _inflight(gateway) == 1 and _stats(gateway)[1] == 0, 10, "slow one runs")
    queued = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(20)]
    try:
        for sock in queued:
            sock.sendall(http_request(f"{_V4}/infer", _body(0.0)))
        wait_until(lambda: _stats(gateway)[1] == 20, 10, "the queue fills")
        head = http_request(f"{_V4}/infer", b"x" * 100_000, {"x-request-id": "r1"})
        # The first refused by the application, the next by the connection itself.
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
                sock.sendall(head[:-100_000])  # and never the body
                status, headers, body = read_response(sock)
            assert slow.is_alive(), "the queue emptied before the check: the test proves nothing"
            assert status == 503 and int(headers["retry-after"]) >= 1
            assert error_of(body) == "queue full (20 waiting requests); retry later"
            assert headers["x-request-id"] == "r1"
    finally:
        for sock in queued:
            sock.close()
        slow.join()


# Goodput itself is a floor here, not the 80% the gateway keeps on a quiet machine: on a
# shared 2-core host the load generator, the refusals and other suites take the cores the
# model runs on (50-85% of capacity measured here); bench/overload.py reports the figure.
@pytest.mark.parametrize("multiple", [1.5, 3.0])
def test_overload_keeps_goodput_and_refuses_with_retry_after(
    gateway: RunningServer, multiple: float
) -> None:
    """Open loop at 1.5x and 3x capacity: every request is answered, 200 or 503 with
    Retry-After, at about the capacity, and the 200s wait no longer than the queue holds.

    Each request costs a few milliseconds of model time here, so that the load generator
    stays cheap next to the server on two cores; bench/overload.py measures the case
    where decoding small JSON requests is the cost."""
    request = http_request(f"{_V4}/infer", _body(1.0), {"Content-Type": "application/json"})
    capacity = closed_loop("127.0.0.1", gateway.port, request, connections=8, duration_s=2)
    r = open_loop("127.0.0.1", gateway.port, request, rate=multiple * capacity, duration_s=3)
    print(f"capacity {capacity:.0f}/s; x{multiple}: {r.summary()}")
    assert r.errors == r.hangs == r.refused_without_retry_after == 0, r.summary()
    assert set(r.statuses) <= {200, 503} and r.refused, r.summary()
    assert r.goodput >= 0.4 * capacity, r.summary()
    # The queue (20) and the batch running, drained at the rate requests were served in
    # this very run: the longest a 200 should wait, give or take.
    served_rate = min(capacity, r.goodput)
    assert r.quantile(0.99) <= 3 * 22 / served_rate + 0.25, r.summary()
