"""The client side of the V2 wire format, read and written by the gateway's own codec."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from model_store.manifest import ModelManifest, TensorSpec
from serving.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    RateLimited,
)
from serving.inference.codec import InferRequest, decode_request, encode_response
from serving.inference.upstream.client import UpstreamUnavailable, error_for_status
from serving.inference.upstream.wire import (
    UpstreamFailed,
    check_metadata,
    decode_infer_response,
    encode_infer_request,
)

MANIFEST = ModelManifest(
    name="m",
    version=1,
    platform="onnxruntime_onnx",
    inputs=[
        TensorSpec(name="x", datatype="FP32", shape=[-1, 2]),
        TensorSpec(name="ids", datatype="INT64", shape=[-1, 3]),
        TensorSpec(name="text", datatype="BYTES", shape=[-1]),
    ],
    outputs=[
        TensorSpec(name="y", datatype="FP16", shape=[-1, 2]),
        TensorSpec(name="label", datatype="BYTES", shape=[-1]),
    ],
    max_batch_size=8,
)


def _inputs(rows: int) -> dict[str, np.ndarray]:
    text = np.empty(rows, dtype=np.object_)
    text[:] = [f"row {i} é".encode() for i in range(rows)]
    return {
        "x": np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) / 3,
        "ids": np.arange(rows * 3, dtype=np.int64).reshape(rows, 3) - 4,
        "text": text,
    }


@pytest.mark.parametrize("binary", [True, False])
def test_a_batch_request_is_what_a_v2_server_decodes_to_the_same_tensors(binary: bool) -> None:
    inputs = _inputs(3)
    body, headers = encode_infer_request(inputs, MANIFEST, binary=binary)
    length = headers.get("inference-header-content-length")
    assert (length is not None) == binary
    req = decode_request(body, MANIFEST, header_length=None if length is None else int(length))
    assert req.batch_size == 3
    for name, value in inputs.items():
        assert req.inputs[name].tolist() == value.tolist()
    # Every output is asked back as binary, unless the upstream speaks JSON only.
    assert req.binary_outputs == ({"y", "label"} if binary else set())


@pytest.mark.parametrize("binary", [True, False])
def test_an_answer_in_either_form_decodes_to_the_outputs(binary: bool) -> None:
    label = np.empty(2, dtype=np.object_)
    label[:] = [b"cat", b"dog"]
    outputs = {"y": np.array([[0.5, 1.5], [2.5, -3.0]], dtype=np.float16), "label": label}
    request = InferRequest(
        id=None,
        inputs={},
        batch_size=2,
        outputs=["label", "y"],
        binary_outputs=frozenset({"y", "label"}) if binary else frozenset(),
        parameters={},
    )
    body, headers = encode_response(
        request, outputs, model_name="m", model_version="1", manifest=MANIFEST
    )
    decoded = decode_infer_response(body, headers.get("inference-header-content-length"), MANIFEST)
    assert decoded["y"].dtype == np.float16
    assert decoded["y"].tolist() == outputs["y"].tolist()
    assert decoded["label"].tolist() == [b"cat", b"dog"]


def _json_answer(**override: Any) -> bytes:
    entry = {"name": "y", "datatype": "FP16", "shape": [1, 2], "data": [1.0, 2.0]}
    label = {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["a"]}
    return orjson.dumps({"outputs": [{**entry, **override}, label]})


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b"<html>", None, "not V2 JSON"),
        (orjson.dumps({"outputs": "no"}), None, "no 'outputs' list"),
        (_json_answer(datatype="FP32"), None, "'y' is 'FP32', not FP16"),
        (_json_answer(shape=[1, 3]), None, "data does not fit"),
        (_json_answer(shape="1x2"), None, "no valid shape"),
        (_json_answer(data=None), None, "neither data nor binary data"),
        (_json_answer(name="z"), None, r"lacks output\(s\) 'y'"),
        (_json_answer(), "99999", "shorter than"),
        (
            _json_answer(parameters={"binary_data_size": 4}, data=None),
            str(len(_json_answer(parameters={"binary_data_size": 4}, data=None))),
            "bad binary_data_size",
        ),
    ],
)
def test_an_answer_that_does_not_fit_the_signature_is_a_502(
    body: bytes, header_length: str | None, message: str
) -> None:
    with pytest.raises(UpstreamFailed, match=message) as caught:
        decode_infer_response(body, header_length, MANIFEST)
    assert caught.value.status_code == 502


def _metadata(**override: Any) -> dict[str, Any]:
    def tensors(specs: list[TensorSpec]) -> list[dict[str, Any]]:
        return [s.model_dump() for s in specs]

    return {
        "name": "m",
        "platform": "",
        "inputs": tensors(MANIFEST.inputs),
        "outputs": tensors(MANIFEST.outputs),
        **override,
    }


def test_the_same_or_a_more_dynamic_signature_fits() -> None:
    assert check_metadata(MANIFEST, _metadata()) == []
    looser = _metadata(
        inputs=[{**t, "shape": [-1, -1]} if t["name"] == "x" else t for t in _metadata()["inputs"]]
    )
    assert check_metadata(MANIFEST, looser) == []


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ({"outputs": [{"name": "y", "datatype": "FP16", "shape": [-1, 2]}]}, "no output 'label'"),
        (
            {
                "inputs": [
                    *_metadata()["inputs"],
                    {"name": "mask", "datatype": "BOOL", "shape": [-1]},
                ]
            },
            "needs input(s) ['mask']",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP64", "shape": [-1, 2]},
                    *_metadata()["inputs"][1:],
                ]
            },
            "input 'x' is FP64 upstream, FP32 here",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [2]},
                    *_metadata()["inputs"][1:],
                ]
            },
            "input 'x' has shape [2] upstream",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [-1, 3]},
                    *_metadata()["inputs"][1:],
                ]
            },
            "input 'x' has shape [-1, 3] upstream",
        ),
        ({"inputs": "x"}, "upstream model metadata"),
        ({"inputs": []}, "no inputs or no outputs"),
    ],
)
def test_a_signature_that_differs_is_named(override: dict[str, Any], problem: str) -> None:
    problems = check_metadata(MANIFEST, _metadata(**override))
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (400, InvalidInput, 400),
        (404, ModelNotFound, 404),
        (429, RateLimited, 429),
        (500, InferenceFailed, 500),
        (502, UpstreamUnavailable, 503),
        (503, UpstreamUnavailable, 503),
        (504, DeadlineExceeded, 504),
        (401, UpstreamFailed, 502),
        (418, UpstreamFailed, 502),
    ],
)
def test_an_upstream_status_maps_to_the_same_meaning_here(
    status: int, error: type[Exception], code: int
) -> None:
    mapped = error_for_status(status, "boom")
    assert type(mapped) is error
    assert mapped.status_code == code
    assert mapped.message == f"upstream answered {status}: boom" + (
        " (check remote.headers)" if status == 401 else ""
    )
