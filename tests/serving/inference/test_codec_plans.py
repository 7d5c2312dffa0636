"""A binary body's repeated JSON header: decoded once, its plan replayed, never wrong.

Each test compares a decode that may replay a plan (the same header seen before, same
manifest) with one that cannot (a copy of the manifest: another signature, no plan).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from model_store.manifest import Artifact, ModelManifest, TensorSpec
from serving.errors import InvalidInput
from serving.inference import codec
from serving.inference.codec import InferRequest, decode_request, decode_request_async
from tests.helpers.spies import spy

Body = tuple[bytes, int]


def _manifest(datatype: str = "FP32", max_batch_size: int = 8) -> ModelManifest:
    """Inputs ``a`` ([-1, 3] of ``datatype``) and ``b`` (INT32 [-1, 1]); output ``y``."""
    return ModelManifest(
        name="m",
        version=1,
        platform="onnx",
        inputs=[
            TensorSpec(name="a", datatype=datatype, shape=[-1, 3]),  # type: ignore[arg-type]
            TensorSpec(name="b", datatype="INT32", shape=[-1, 1]),
        ],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 3])],
        max_batch_size=max_batch_size,
        artifacts=[Artifact(file="model.onnx", sha256="0" * 64, size=1, target="onnxruntime")],
    )


def _fresh(manifest: ModelManifest) -> ModelManifest:
    """An equal manifest of its own identity: its signature has no plans."""
    return manifest.model_copy()


def _body(a: bytes, b: bytes, *, rows: int = 2, a_size: int | None = None) -> Body:
    """A binary body for ``_manifest``: ``a``'s and ``b``'s bytes after the header."""
    header = {
        "id": "r-1",
        "parameters": {"tag": "x", "binary_data_output": True},
        "inputs": [
            _input("a", [rows, 3], "FP32", len(a) if a_size is None else a_size),
            _input("b", [rows, 1], "INT32", 4 * rows),
        ],
        "outputs": [{"name": "y"}],
    }
    return _framed(header, a, b)


def _floats(value: float, rows: int = 2) -> bytes:
    return np.full(3 * rows, value, "<f4").tobytes()


def _ints(value: int, rows: int = 2) -> bytes:
    return np.full(rows, value, "<i4").tobytes()


def _input(name: str, shape: list[int], datatype: str, size: int) -> dict[str, Any]:
    """A header's entry for an input of ``size`` bytes in the binary part."""
    return {
        "name": name,
        "shape": shape,
        "datatype": datatype,
        "parameters": {"binary_data_size": size},
    }


def _framed(header: dict[str, Any], *parts: bytes) -> Body:
    """A binary body: ``header`` as JSON, then ``parts``; and the header's length."""
    head = orjson.dumps(header)
    return head + b"".join(parts), len(head)


def _decode(body: Body, manifest: ModelManifest, **kw: Any) -> InferRequest:
    return decode_request(body[0], manifest, header_length=body[1], **kw)


def _error(body: Body, manifest: ModelManifest, **kw: Any) -> str:
    with pytest.raises(InvalidInput) as caught:
        _decode(body, manifest, **kw)
    return str(caught.value)


def _same(one: InferRequest, other: InferRequest) -> None:
    assert (one.id, one.batch_size, one.outputs) == (other.id, other.batch_size, other.outputs)
    assert one.binary_outputs == other.binary_outputs
    assert one.parameters == other.parameters
    assert one.inputs.keys() == other.inputs.keys()
    for name, arr in one.inputs.items():
        assert arr.dtype == other.inputs[name].dtype
        np.testing.assert_array_equal(arr, other.inputs[name])


def test_a_repeated_header_decodes_each_bodys_own_tensors() -> None:
    m = _manifest()
    first = _decode(_body(_floats(1.0), _ints(7)), m)
    second = _decode(_body(_floats(2.5), _ints(9)), m)
    np.testing.assert_array_equal(first.inputs["a"], np.full((2, 3), 1.0, np.float32))
    np.testing.assert_array_equal(second.inputs["a"], np.full((2, 3), 2.5, np.float32))
    np.testing.assert_array_equal(second.inputs["b"], [[9], [9]])
    _same(second, _decode(_body(_floats(2.5), _ints(9)), _fresh(m)))
    assert second.id == "r-1"
    assert second.parameters == {"tag": "x"}
    assert second.binary_outputs == frozenset({"y"})


def test_a_repeated_header_is_not_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _manifest()
    _decode(_body(_floats(1.0), _ints(1)), m)
    parsed = spy(monkeypatch, codec, "_loads")
    again = _decode(_body(_floats(3.0), _ints(3)), m)
    assert parsed == []
    np.testing.assert_array_equal(again.inputs["a"], np.full((2, 3), 3.0, np.float32))
    _decode(_body(_floats(3.0, rows=3), _ints(3, rows=3), rows=3), m)  # another header
    assert len(parsed) == 1


async def test_the_async_decode_replays_plans_too() -> None:
    m = _manifest()
    body = _body(_floats(1.0), _ints(1))
    await decode_request_async(body[0], m, header_length=body[1])
    body = _body(_floats(4.0), _ints(4))
    again = await decode_request_async(body[0], m, header_length=body[1])
    _same(again, _decode(body, _fresh(m)))


def test_a_results_parameters_and_outputs_are_its_own() -> None:
    m = _manifest()
    first = _decode(_body(_floats(1.0), _ints(1)), m)
    first.parameters["tag"] = "changed"
    first.outputs.append("changed")
    second = _decode(_body(_floats(1.0), _ints(1)), m)
    assert second.parameters == {"tag": "x"}
    assert second.outputs == ["y"]
    second.parameters.clear()
    assert _decode(_body(_floats(1.0), _ints(1)), m).parameters == {"tag": "x"}


def test_a_binary_part_of_another_length_gets_the_full_message() -> None:
    m = _manifest()
    _decode(_body(_floats(1.0), _ints(1)), m)
    short = (_body(_floats(1.0), _ints(1))[0][:-2], _body(_floats(1.0), _ints(1))[1])
    long = (_body(_floats(1.0), _ints(1))[0] + b"xx", _body(_floats(1.0), _ints(1))[1])
    for body in (short, long):
        message = _error(body, m)
        assert message == _error(body, _fresh(m))
    assert "bytes of binary data" in _error(long, m)


def test_a_plan_of_one_batch_limit_does_not_serve_another() -> None:
    m = _manifest()
    body = _body(_floats(1.0), _ints(1))
    _decode(body, m, max_batch_size=8)
    assert "over the max batch size of 1" in _error(body, m, max_batch_size=1)
    assert _decode(body, m, max_batch_size=2).batch_size == 2


def test_a_bool_tensors_bytes_are_checked_every_time() -> None:
    m = _manifest("BOOL")

    def body(raw: bytes) -> Body:
        header = {
            "inputs": [
                _input("a", [1, 3], "BOOL", 3),
                _input("b", [1, 1], "INT32", 4),
            ]
        }
        return _framed(header, raw, _ints(0, rows=1))

    assert _decode(body(b"\x01\x00\x01"), m).inputs["a"].tolist() == [[True, False, True]]
    assert "BOOL bytes must be 0 or 1" in _error(body(b"\x01\x02\x01"), m)
    assert _decode(body(b"\x00\x00\x01"), m).inputs["a"].tolist() == [[False, False, True]]


def test_json_data_beside_binary_is_decoded_each_time() -> None:
    m = _manifest()

    def body(value: int) -> Body:
        header = {
            "inputs": [
                _input("a", [1, 3], "FP32", 12),
                {"name": "b", "shape": [1, 1], "datatype": "INT32", "data": [value]},
            ]
        }
        return _framed(header, _floats(1.0, rows=1))

    assert _decode(body(5), m).inputs["b"].tolist() == [[5]]
    assert _decode(body(6), m).inputs["b"].tolist() == [[6]]
    assert "INT32" in _error(body(2**40), m)


def test_a_header_that_failed_leaves_no_plan() -> None:
    m = _manifest()
    bad = _body(_floats(1.0), _ints(1), a_size=20)  # a's size does not fit its shape
    first = _error(bad, m)
    assert _error(bad, m) == first


def test_many_headers_keep_a_bounded_number_of_plans() -> None:
    m = _manifest()
    for rows in range(1, 9):
        for tag in range(codec._MAX_PLANS // 4):
            header = {
                "parameters": {"tag": tag},
                "inputs": [
                    _input("a", [rows, 3], "FP32", 12 * rows),
                    _input("b", [rows, 1], "INT32", 4 * rows),
                ],
            }
            req = _decode(_framed(header, _floats(1.0, rows), _ints(rows, rows)), m)
            assert req.parameters == {"tag": tag} and req.batch_size == rows
            assert len(codec._PLANS) <= codec._MAX_PLANS


def test_nested_parameters_are_never_shared_between_requests() -> None:
    m = _manifest()
    header = {
        "parameters": {"nested": {"k": [1]}},
        "inputs": [
            _input("a", [1, 3], "FP32", 12),
            _input("b", [1, 1], "INT32", 4),
        ],
    }
    body = _framed(header, _floats(1.0, rows=1), _ints(1, rows=1))
    first = _decode(body, m)
    first.parameters["nested"]["k"].append(2)
    assert _decode(body, m).parameters == {"nested": {"k": [1]}}
