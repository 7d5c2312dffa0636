"""The V2 protocol end to end, driven by tritonclient's HTTP client against the real server."""

from __future__ import annotations

import http.client
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from model_store.store import ModelStore
from tests.helpers.servers import RunningServer


@pytest.fixture(scope="module")
def client(server: RunningServer) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", concurrency=8)


def _samples(store: ModelStore, version: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    manifest = store.manifest("digits", version)
    entry = next(f for f in manifest.files if f.file == "samples.npz")
    with np.load(store.artifact_path(manifest, entry)) as npz:
        return npz["input"].astype(np.float32), npz["labels"]


def _reference(store: ModelStore, x: np.ndarray, version: int | None = None) -> np.ndarray:
    manifest = store.manifest("digits", version)
    artifact = manifest.artifact("onnxruntime")
    assert artifact is not None
    session = ort.InferenceSession(
        str(store.artifact_path(manifest, artifact)), providers=["CPUExecutionProvider"]
    )
    out: np.ndarray = session.run(["logits"], {"input": x})[0]
    return out


def _infer(
    client: httpclient.InferenceServerClient,
    x: np.ndarray,
    *,
    binary: bool,
    version: str = "",
) -> httpclient.InferResult:
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("logits", binary_data=binary)
    return client.infer("digits", [inp], model_version=version, outputs=[out], request_id="r-1")


def test_server_and_model_health(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert client.is_model_ready("digits", "2")
    assert not client.is_model_ready("digits", "99")
    meta = client.get_server_metadata()
    assert meta["name"] == "fermion"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_config(client: httpclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("digits")
    assert meta["name"] == "digits"
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    config = client.get_model_config("digits", "1")
    assert config["max_batch_size"] == 64
    assert config["input"][0]["dims"] == [1, 28, 28]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert "dynamic_batching" in config
    assert config["artifact"]["target"] == "onnxruntime"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_predictions_equal_in_process_onnxruntime(
    client: httpclient.InferenceServerClient, demo_store: ModelStore, binary: bool
) -> None:
    x, _ = _samples(demo_store)
    for batch in (x[:1], x[1:9], x[9:73]):
        result = _infer(client, batch, binary=binary)
        got = result.as_numpy("logits")
        np.testing.assert_allclose(got, _reference(demo_store, batch), rtol=1e-5, atol=1e-5)
        response = result.get_response()
        assert response["model_version"] == "2"
        assert response["id"] == "r-1"


def test_pinned_version_answers(
    client: httpclient.InferenceServerClient, demo_store: ModelStore
) -> None:
    x, _ = _samples(demo_store)
    result = _infer(client, x[:4], binary=True, version="1")
    assert result.get_response()["model_version"] == "1"
    np.testing.assert_allclose(
        result.as_numpy("logits"), _reference(demo_store, x[:4], 1), rtol=1e-5, atol=1e-5
    )


def test_digits_get_their_labels_at_the_recorded_accuracy(
    client: httpclient.InferenceServerClient, demo_store: ModelStore
) -> None:
    for version in (1, 2):
        x, labels = _samples(demo_store, version)
        predicted = np.concatenate(
            [
                _infer(client, x[i : i + 64], binary=True, version=str(version))
                .as_numpy("logits")
                .argmax(axis=1)
                for i in range(0, len(x), 64)
            ]
        )
        accuracy = float((predicted == labels).mean())
        recorded = demo_store.manifest("digits", version).metadata["accuracy"]
        assert accuracy >= 0.95
        assert accuracy == pytest.approx(recorded, abs=1.0 / len(labels))


def test_concurrent_requests_are_batched(
    client: httpclient.InferenceServerClient, server: RunningServer, demo_store: ModelStore
) -> None:
    x, _ = _samples(demo_store)
    before = client.get_inference_statistics("digits", "2")["model_stats"][0]
    # 200 requests in flight at once: each written whole (tritonclient's own body) on its
    # own connection before any answer is read. (tritonclient's async_infer overlaps
    # only as its client-side timing allows; that would be measured, not the batcher.)
    connections = []
    for i in range(200):
        inp = httpclient.InferInput("input", [1, 1, 28, 28], "FP32")
        inp.set_data_from_numpy(x[i : i + 1], binary_data=True)
        body, header_length = httpclient.InferenceServerClient.generate_request_body([inp])
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        headers = {"Inference-Header-Content-Length": str(header_length)}
        conn.request("POST", "/v2/models/digits/versions/2/infer", body=body, headers=headers)
        connections.append(conn)
    expected = _reference(demo_store, x[:200])
    for i, conn in enumerate(connections):
        response = conn.getresponse()
        assert response.status == 200
        length = response.getheader("Inference-Header-Content-Length")
        result = httpclient.InferResult.from_response_body(
            response.read(), header_length=int(length) if length else None
        )
        conn.close()
        got = result.as_numpy("logits")
        np.testing.assert_allclose(got, expected[i : i + 1], rtol=1e-5, atol=1e-5)
    after = client.get_inference_statistics("digits", "2")["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 200
    executions = after["execution_count"] - before["execution_count"]
    assert executions < 200, "concurrent requests must share batches"
    # The statistics are cumulative over the session: what these 200 requests added.
    batches = _batch_counts(after)
    for size, count in _batch_counts(before).items():
        batches[size] -= count
    ran = {size: count for size, count in batches.items() if count}
    assert sum(ran.values()) == executions, ran
    assert sum(size * count for size, count in ran.items()) == 200, ran
    assert max(ran) > 1, ran


def _batch_counts(stats: dict[str, Any]) -> dict[int, int]:
    """How many batches of each size a version has executed, from its V2 statistics."""
    return {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
