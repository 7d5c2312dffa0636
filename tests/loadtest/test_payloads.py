"""Request bodies built from model metadata decode, with the gateway's own codec, to the
inputs they were built from."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from loadtest.payloads import (
    HEADER_LENGTH,
    build_payloads,
    error_message,
    infer_path,
    served_version,
)
from model_store.manifest import Artifact, ModelManifest, TensorSpec
from serving.inference.codec import decode_request

DIGITS = {
    "name": "digits",
    "versions": ["1", "2"],
    "platform": "onnxruntime_onnx",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
}

MIXED = {
    "name": "mixed",
    "inputs": [
        {"name": "ids", "datatype": "INT64", "shape": [-1, 5]},
        {"name": "mask", "datatype": "BOOL", "shape": [-1, -1]},
        {"name": "text", "datatype": "BYTES", "shape": [-1, 2]},
        {"name": "half", "datatype": "FP16", "shape": [-1, 3]},
    ],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
}


def manifest(metadata: dict[str, Any]) -> ModelManifest:
    return ModelManifest(
        name=metadata["name"],
        version=1,
        platform="onnxruntime_onnx",
        inputs=[TensorSpec(**t) for t in metadata["inputs"]],
        outputs=[TensorSpec(**t) for t in metadata["outputs"]],
        max_batch_size=64,
        artifacts=[Artifact(file="model.onnx", sha256="0" * 64, size=1, target="onnxruntime")],
    )


def decode(body: bytes, headers: dict[str, str], m: ModelManifest) -> dict[str, np.ndarray]:
    length = headers.get(HEADER_LENGTH)
    req = decode_request(body, m, header_length=None if length is None else int(length))
    return req.inputs


@pytest.mark.parametrize("binary", [False, True])
def test_samples_become_valid_requests_of_those_rows(binary: bool) -> None:
    rng = np.random.default_rng(1)
    samples: dict[str, np.ndarray] = {
        "input": rng.random((10, 1, 28, 28)).astype(np.float32),
        "labels": np.arange(10),
    }
    payloads = build_payloads(DIGITS, samples, binary=binary, batch_size=3, count=5)
    assert len(payloads) == 5
    m = manifest(DIGITS)
    for i, p in enumerate(payloads):
        got = decode(p.body, p.headers, m)["input"]
        rows = [(i * 3 + j) % 10 for j in range(3)]
        np.testing.assert_array_equal(got, samples["input"][rows])
        assert (HEADER_LENGTH in p.headers) is binary
    if binary:
        header = orjson.loads(payloads[0].body[: int(payloads[0].headers[HEADER_LENGTH])])
        assert header["parameters"]["binary_data_output"] is True


@pytest.mark.parametrize("binary", [False, True])
def test_random_inputs_fit_every_datatype_and_dynamic_dims(binary: bool) -> None:
    payloads = build_payloads(MIXED, None, binary=binary, batch_size=2, count=3)
    m = manifest(MIXED)
    bodies = set()
    for p in payloads:
        inputs = decode(p.body, p.headers, m)
        assert inputs["ids"].shape == (2, 5) and inputs["ids"].dtype == np.int64
        assert inputs["mask"].shape == (2, 1) and inputs["mask"].dtype == np.bool_
        assert inputs["text"].shape == (2, 2)
        assert inputs["half"].dtype == np.float16
        bodies.add(p.body)
    assert len(bodies) == 3  # distinct requests, not one repeated


def test_samples_that_do_not_fit_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"no array for input 'input'.*labels"):
        build_payloads(DIGITS, {"labels": np.arange(3)})
    with pytest.raises(ValueError, match=r"rows of shape \[1, 8, 8\]"):
        build_payloads(DIGITS, {"input": np.zeros((4, 1, 8, 8), np.float32)})


def test_served_version_from_header_json_or_binary_prefix() -> None:
    body = orjson.dumps({"model_name": "digits", "model_version": "2", "outputs": []})
    assert served_version("3", body, None) == "3"
    assert served_version(None, body, None) == "2"
    assert served_version(None, body + b"\x00\x01binary", str(len(body))) == "2"
    assert served_version(None, b"not json", None) is None
    assert served_version(None, b"{}", None) is None


def test_error_messages_keep_status_and_the_servers_words() -> None:
    assert error_message(503, b'{"error": "queue full: 2048 waiting"}') == (
        "503 queue full: 2048 waiting"
    )
    assert error_message(502, b"<html>Bad\n gateway</html>") == "502 <html>Bad gateway</html>"
    assert len(error_message(400, orjson.dumps({"error": "x" * 500}))) < 170


def test_infer_paths() -> None:
    assert infer_path("digits") == "/v2/models/digits/infer"
    assert infer_path("digits", "2") == "/v2/models/digits/versions/2/infer"
