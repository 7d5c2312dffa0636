"""Large and compressed bodies are decoded a slice at a time: the event loop keeps running,
memory stays within a small multiple of the body, and the result is the same."""

from __future__ import annotations

import asyncio
import gzip
import time
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import numpy as np
import orjson
import pytest

from model_store.manifest import Artifact, ModelManifest, TensorSpec
from serving.errors import InvalidInput
from serving.inference.codec import SLICE_BYTES, _inflate, decode_request, decode_request_async

_FEATURES = 4096


def _manifest(datatype: Literal["FP32", "BOOL"] = "FP32") -> ModelManifest:
    return ModelManifest(
        name="wide",
        version=1,
        platform="onnxruntime_onnx",
        inputs=[TensorSpec(name="x", datatype=datatype, shape=[-1, _FEATURES])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 1])],
        max_batch_size=1024,
        artifacts=[Artifact(file="model.onnx", sha256="0" * 64, size=1, target="onnxruntime")],
    )


def _body(x: np.ndarray, *, nested: bool = False, **extra: Any) -> bytes:
    data = x.tolist() if nested else x.ravel().tolist()
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": data}
    return orjson.dumps({"id": "big", "inputs": [tensor], **extra})


async def _stalls(work: Callable[[], Awaitable[object]]) -> tuple[list[float], object]:
    """How long the loop went without running another task, each time, while ``work`` ran."""
    stalls: list[float] = []
    done = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0)
            now = time.perf_counter()
            stalls.append(now - last)
            last = now

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    try:
        result = await work()
    finally:
        done = True
        await tick
    return sorted(stalls), result


def _p95(stalls: list[float]) -> float:
    """The 95th percentile stall: robust to the host preempting this process now and then."""
    return stalls[int(0.95 * (len(stalls) - 1))]


@pytest.mark.parametrize("nested", [False, True])
async def test_a_large_body_decodes_to_the_same_tensors(nested: bool) -> None:
    x = np.random.default_rng(0).random((32, _FEATURES), dtype=np.float32)
    body = _body(x, nested=nested, parameters={"flag": True})
    assert len(body) > 4 * SLICE_BYTES
    sliced = await decode_request_async(body, _manifest())
    whole = decode_request(body, _manifest())
    np.testing.assert_array_equal(sliced.inputs["x"], x)
    np.testing.assert_array_equal(whole.inputs["x"], x)
    assert (sliced.id, sliced.parameters, sliced.batch_size) == ("big", {"flag": True}, 32)


async def test_decoding_a_large_body_never_holds_the_loop() -> None:
    x = np.random.default_rng(1).random((400, _FEATURES), dtype=np.float32)
    body = _body(x)  # about 30 MB of JSON
    manifest = _manifest()

    async def whole() -> object:
        return decode_request(body, manifest)

    baseline, _ = await _stalls(whole)
    stalls, _ = await _stalls(lambda: decode_request_async(body, manifest))
    # Decoded whole, the loop stalls for the whole parse; in slices, it runs between
    # steps that each take a small part of that.
    assert len(stalls) > 50 and _p95(stalls) < baseline[-1] / 20, (_p95(stalls), baseline)


async def test_decoding_a_large_body_takes_a_small_multiple_of_its_size() -> None:
    x = np.random.default_rng(1).random((100, _FEATURES), dtype=np.float32)
    body = _body(x)  # about 8 MB of JSON
    manifest = _manifest()
    tracemalloc.start()
    try:
        decode_request(body, manifest)
        whole_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        await decode_request_async(body, manifest)
        sliced_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Python floats take several times the body's text; typed slices do not.
    assert sliced_peak < len(body) < whole_peak / 2, (sliced_peak, len(body), whole_peak)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda b: b.replace(b'"id":"big"', b'"junk":[' + b"1," * 5000 + b'1],"id":"big"'),
            "long array of numbers outside the inputs' 'data'",
        ),
        (lambda b: b.replace(b"]}]", b",1]}]"), "'data' has 131073 elements but shape"),
        (
            lambda b: b.replace(b"[[", b"[[[", 1).replace(b"]]", b"]]]", 1),
            "nested 'data' does not match shape",
        ),
        (lambda b: b.replace(b"],[", b"],,[", 1), "'data' is not valid FP32"),
    ],
)
async def test_a_large_body_that_is_wrong_is_refused_like_a_small_one(
    change: Callable[[bytes], bytes], message: str
) -> None:
    x = np.random.default_rng(2).random((32, _FEATURES), dtype=np.float32)
    body = change(_body(x, nested=True))
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        await decode_request_async(body, _manifest())


async def test_json_booleans_are_not_numbers() -> None:
    data: list[object] = [0.5] * _FEATURES
    data[7] = True
    body = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [1, _FEATURES], "datatype": "FP32", "data": data}]}
    )
    with pytest.raises(InvalidInput, match="holds true/false, not valid FP32"):
        decode_request(body, _manifest())
    body = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, _FEATURES],
                    "datatype": "BOOL",
                    "data": [True, False] * (_FEATURES // 2),
                }
            ]
        }
    )
    assert decode_request(body, _manifest("BOOL")).inputs["x"].dtype == np.bool_


async def test_gzip_is_inflated_in_slices_and_one_member_only() -> None:
    limit = 128 << 20
    raw = b"\0" * (96 << 20)
    bomb = zlib.compress(raw, 9, wbits=31)
    headers = {"content-encoding": "gzip"}

    async def whole() -> object:
        return zlib.decompress(bomb, wbits=31)

    baseline, _ = await _stalls(whole)
    stalls, inflated = await _stalls(lambda: _inflate(bomb, headers, limit))
    assert inflated == raw
    assert len(stalls) > 20 and _p95(stalls) < baseline[-1] / 10, (_p95(stalls), baseline)
    two_members = gzip.compress(b"{}") + gzip.compress(b'{"more": 1}')
    with pytest.raises(InvalidInput, match="data after the end of its gzip member"):
        await _inflate(two_members, headers, limit)
