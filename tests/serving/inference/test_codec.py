"""V2 codec: JSON and binary tensors round-trip, bad requests fail with 400, tritonclient agrees."""

from __future__ import annotations

import math
import random
import struct
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from model_store.manifest import DATATYPES, Artifact, ModelManifest, TensorSpec
from serving.errors import InferenceFailed, InvalidInput
from serving.inference.codec import (
    DATATYPE_TO_NUMPY,
    HEADER_LENGTH,
    NUMPY_TO_DATATYPE,
    InferRequest,
    decode_request,
    encode_error,
    encode_response,
)

JSONDict = dict[str, Any]


def _manifest(
    inputs: list[tuple[str, str, list[int]]],
    outputs: list[tuple[str, str, list[int]]],
    max_batch_size: int = 4,
) -> ModelManifest:
    return ModelManifest(
        name="m",
        version=1,
        platform="onnx",
        inputs=[TensorSpec(name=n, datatype=d, shape=s) for n, d, s in inputs],  # type: ignore[arg-type]
        outputs=[TensorSpec(name=n, datatype=d, shape=s) for n, d, s in outputs],  # type: ignore[arg-type]
        max_batch_size=max_batch_size,
        artifacts=[Artifact(file="model.onnx", sha256="0" * 64, size=1, target="onnxruntime")],
    )


# image FP32 [-1, 2, 2] and count INT32 [-1, 1] in; scores FP32 [-1, 3] and label INT64 [-1] out.
MODEL = _manifest(
    [("image", "FP32", [-1, 2, 2]), ("count", "INT32", [-1, 1])],
    [("scores", "FP32", [-1, 3]), ("label", "INT64", [-1])],
)
DIGITS = _manifest([("input", "FP32", [-1, 1, 28, 28])], [("logits", "FP32", [-1, 10])], 64)


def _typed(datatype: str, batched: bool = True) -> ModelManifest:
    """One input ``x`` and one output ``y`` of ``datatype``, [-1, 2, 3] (or [2, 3])."""
    shape = [-1, 2, 3] if batched else [2, 3]
    return _manifest([("x", datatype, shape)], [("y", datatype, shape)], 8 if batched else 0)


def _sample(datatype: str, shape: tuple[int, ...] = (2, 2, 3), binary: bool = False) -> np.ndarray:
    """Values of ``datatype`` including its extremes; BYTES has non-UTF-8 only if ``binary``."""
    n = math.prod(shape)
    values: list[Any]
    arr: np.ndarray
    if datatype == "BYTES":
        values = [b"", b"a", "\u00e9t\u00e9 \u2603".encode(), b"x" * 300, b'tab\tquote"', b"z"]
        if binary:
            values += [b"\x00\xff\xfe", b"\x00"]
        arr = np.empty(n, dtype=object)
        arr[:] = [values[i % len(values)] for i in range(n)]
        return arr.reshape(shape)
    dtype = DATATYPE_TO_NUMPY[datatype]
    if datatype == "BOOL":
        arr = np.arange(n) % 3 == 0
        return arr.reshape(shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = [int(info.min), int(info.max), 0, 1, int(info.max) - 1, int(info.min) + 7]
    else:
        finfo = np.finfo(dtype)
        values = [0.0, -0.0, 1.5, -2.25, float(finfo.max), float(finfo.tiny), 0.1, -1e-3]
    arr = np.array([values[i % len(values)] for i in range(n)], dtype=dtype)
    return arr.reshape(shape)


def _json_data(arr: np.ndarray) -> list[Any]:
    items: list[Any] = arr.reshape(-1).tolist()
    return [v.decode() if isinstance(v, bytes) else v for v in items]


def _json_input(name: str, datatype: str, arr: np.ndarray) -> JSONDict:
    return {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": _json_data(arr)}


def _serialize(arr: np.ndarray) -> bytes:
    """Raw wire bytes of a tensor: little-endian, or length-prefixed elements for BYTES."""
    if arr.dtype == object:
        return b"".join(struct.pack("<I", len(v)) + v for v in arr.reshape(-1).tolist())
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def _binary_body(header: JSONDict, payloads: list[bytes]) -> tuple[bytes, int]:
    head = orjson.dumps(header)
    return head + b"".join(payloads), len(head)


def _binary_input(name: str, datatype: str, arr: np.ndarray) -> tuple[JSONDict, bytes]:
    raw = _serialize(arr)
    entry = {
        "name": name,
        "shape": list(arr.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": len(raw)},
    }
    return entry, raw


def _model_inputs(rows: int = 1) -> list[JSONDict]:
    image = np.arange(rows * 4, dtype=np.float32).reshape(rows, 2, 2) / 4
    return [
        _json_input("image", "FP32", image),
        _json_input("count", "INT32", np.full((rows, 1), 7, dtype=np.int32)),
    ]


def _model_outputs(rows: int = 1) -> dict[str, np.ndarray]:
    scores = np.linspace(0, 1, rows * 3, dtype=np.float32).reshape(rows, 3)
    return {"scores": scores, "label": np.arange(rows, dtype=np.int64)}


def _decode_json(request: JSONDict, manifest: ModelManifest = MODEL, **kw: Any) -> InferRequest:
    return decode_request(orjson.dumps(request), manifest, **kw)


def _parse_response(body: bytes, headers: dict[str, str]) -> tuple[JSONDict, dict[str, np.ndarray]]:
    """Our own reading of a response: its JSON header and every output as numpy."""
    length = headers.get(HEADER_LENGTH)
    if length is None:
        assert headers["content-type"] == "application/json"
        header, rest = orjson.loads(body), b""
    else:
        assert headers["content-type"] == "application/octet-stream"
        header, rest = orjson.loads(body[: int(length)]), body[int(length) :]
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for out in header["outputs"]:
        dtype = DATATYPE_TO_NUMPY[out["datatype"]]
        if "data" in out:
            assert "parameters" not in out
            data = out["data"]
            if out["datatype"] == "BYTES":
                data = [s.encode() for s in data]
            arr = np.empty(len(data), dtype=dtype)
            arr[:] = data
        else:
            size = out["parameters"]["binary_data_size"]
            raw = rest[offset : offset + size]
            offset += size
            if out["datatype"] == "BYTES":
                items, pos = [], 0
                while pos < len(raw):
                    (n,) = struct.unpack_from("<I", raw, pos)
                    items.append(raw[pos + 4 : pos + 4 + n])
                    pos += 4 + n
                arr = np.empty(len(items), dtype=object)
                arr[:] = items
            else:
                arr = np.frombuffer(raw, dtype)
        arrays[out["name"]] = arr.reshape(out["shape"])
    assert offset == len(rest)
    return header, arrays


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object
        assert got.reshape(-1).tolist() == want.reshape(-1).tolist()
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def _invalid(body: bytes, manifest: ModelManifest = MODEL, **kw: Any) -> str:
    with pytest.raises(InvalidInput) as info:
        decode_request(body, manifest, **kw)
    assert info.value.status_code == 400
    return info.value.message


# ----------------------------------------------------------------------------- tables


def test_datatype_tables_cover_every_v2_datatype_and_invert() -> None:
    assert set(DATATYPE_TO_NUMPY) == set(DATATYPES)
    assert DATATYPE_TO_NUMPY["BYTES"] == np.dtype(object)
    for name, dtype in DATATYPE_TO_NUMPY.items():
        assert NUMPY_TO_DATATYPE[dtype] == name
        assert dtype.byteorder in "<|="
    assert NUMPY_TO_DATATYPE[np.dtype(np.float32)] == "FP32"


def test_encode_error() -> None:
    assert orjson.loads(encode_error('bad "x"\n')) == {"error": 'bad "x"\n'}


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("datatype", DATATYPES)
def test_json_round_trip_every_datatype(datatype: str) -> None:
    manifest = _typed(datatype)
    x = _sample(datatype)
    req = _decode_json({"inputs": [_json_input("x", datatype, x)]}, manifest)
    assert req.batch_size == 2
    assert req.outputs == ["y"] and req.binary_outputs == frozenset()
    _assert_same(req.inputs["x"], x)

    body, headers = encode_response(
        req, {"y": req.inputs["x"]}, model_name="m", model_version="1", manifest=manifest
    )
    header, outputs = _parse_response(body, headers)
    assert header["outputs"][0]["datatype"] == datatype
    assert header["outputs"][0]["shape"] == [2, 2, 3]
    _assert_same(outputs["y"], x)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_binary_round_trip_every_datatype(datatype: str) -> None:
    manifest = _typed(datatype)
    x = _sample(datatype, binary=True)
    entry, raw = _binary_input("x", datatype, x)
    body, length = _binary_body(
        {"inputs": [entry], "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}, [raw]
    )
    req = decode_request(body, manifest, header_length=length)
    _assert_same(req.inputs["x"], x)
    assert req.binary_outputs == frozenset({"y"})
    if datatype != "BYTES":  # a view of the body, not a copy
        assert not req.inputs["x"].flags.owndata
        assert not req.inputs["x"].flags.writeable

    body, headers = encode_response(
        req, {"y": req.inputs["x"]}, model_name="m", model_version="1", manifest=manifest
    )
    header, outputs = _parse_response(body, headers)
    assert headers[HEADER_LENGTH] == str(len(orjson.dumps(header)))
    assert header["outputs"][0]["parameters"] == {"binary_data_size": len(raw)}
    assert body.endswith(raw)
    _assert_same(outputs["y"], x)


def test_binary_inputs_are_views_of_the_body() -> None:
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    entry, raw = _binary_input("x", "FP32", x)
    body, length = _binary_body({"inputs": [entry]}, [raw])
    buffer = bytearray(body)
    req = decode_request(memoryview(buffer), _typed("FP32"), header_length=length)
    buffer[-4:] = np.float32(-1).tobytes()  # the last element, changed in the body
    assert req.inputs["x"][1, 1, 2] == -1


def test_a_body_given_as_memoryview_decodes_the_same() -> None:
    x = _sample("FP32")
    entry, raw = _binary_input("x", "FP32", x)
    body, length = _binary_body({"inputs": [entry]}, [raw])
    req = decode_request(memoryview(body), _typed("FP32"), header_length=length)
    _assert_same(req.inputs["x"], x)


def test_nested_data_equals_flat_data() -> None:
    flat = _model_inputs(rows=2)
    nested = [dict(e, data=np.array(e["data"]).reshape(e["shape"]).tolist()) for e in flat]
    a = _decode_json({"inputs": flat})
    b = _decode_json({"inputs": nested})
    for name in ("image", "count"):
        _assert_same(a.inputs[name], b.inputs[name])
    assert a.inputs["image"].shape == (2, 2, 2) and a.batch_size == 2


def test_bytes_json_strings_become_utf8_bytes() -> None:
    req = _decode_json(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 3],
                    "datatype": "BYTES",
                    "data": [["a", "", "\u00e9"]] * 2,
                }
            ]
        },
        _typed("BYTES", batched=False),
    )
    assert req.inputs["x"].tolist() == [[b"a", b"", b"\xc3\xa9"]] * 2
    assert req.batch_size == 1


def test_bool_accepts_json_booleans_and_0_1() -> None:
    manifest = _manifest([("b", "BOOL", [3])], [("y", "BOOL", [3])], 0)
    for data in ([True, False, True], [1, 0, 1]):
        req = _decode_json(
            {"inputs": [{"name": "b", "shape": [3], "datatype": "BOOL", "data": data}]}, manifest
        )
        _assert_same(req.inputs["b"], np.array([True, False, True]))


def test_integral_json_numbers_convert_to_float_inputs() -> None:
    req = _decode_json(
        {
            "inputs": [
                {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4.5, -5, 6]}
            ]
        },
        _typed("FP32", batched=False),
    )
    _assert_same(req.inputs["x"], np.array([[1, 2, 3], [4.5, -5, 6]], dtype=np.float32))


def test_mixed_json_and_binary_inputs() -> None:
    image = np.ones((1, 2, 2), np.float32)
    entry, raw = _binary_input("image", "FP32", image)
    header = {"inputs": [_json_input("count", "INT32", np.array([[3]], np.int32)), entry]}
    body, length = _binary_body(header, [raw])
    req = decode_request(body, MODEL, header_length=length)
    _assert_same(req.inputs["image"], image)
    _assert_same(req.inputs["count"], np.array([[3]], np.int32))


def test_binary_tensors_follow_the_order_of_the_inputs() -> None:
    count = np.array([[5], [6]], np.int32)
    image = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    (e1, r1), (e2, r2) = (
        _binary_input("count", "INT32", count),
        _binary_input("image", "FP32", image),
    )
    body, length = _binary_body({"inputs": [e1, e2]}, [r1, r2])
    req = decode_request(body, MODEL, header_length=length)
    _assert_same(req.inputs["count"], count)
    _assert_same(req.inputs["image"], image)
    assert req.batch_size == 2


def test_a_header_length_covering_the_whole_body_is_plain_json() -> None:
    body = orjson.dumps({"inputs": _model_inputs()})
    req = decode_request(body, MODEL, header_length=len(body))
    assert req.inputs["count"].tolist() == [[7]]


# ----------------------------------------------------------------------------- outputs


def test_all_outputs_as_json_when_none_requested() -> None:
    req = _decode_json({"inputs": _model_inputs()})
    assert req.outputs == ["scores", "label"] and req.binary_outputs == frozenset()
    body, headers = encode_response(
        req, _model_outputs(), model_name="m", model_version="3", manifest=MODEL
    )
    assert headers == {"content-type": "application/json"}
    response = orjson.loads(body)
    assert response == {
        "model_name": "m",
        "model_version": "3",
        "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [1, 3], "data": [0.0, 0.5, 1.0]},
            {"name": "label", "datatype": "INT64", "shape": [1], "data": [0]},
        ],
    }


def test_requested_output_subset_in_request_order() -> None:
    req = _decode_json(
        {
            "inputs": _model_inputs(),
            "outputs": [{"name": "label"}, {"name": "scores", "parameters": {"binary_data": True}}],
        }
    )
    assert req.outputs == ["label", "scores"]
    assert req.binary_outputs == frozenset({"scores"})
    only = _decode_json({"inputs": _model_inputs(), "outputs": [{"name": "label"}]})
    body, headers = encode_response(
        only, _model_outputs(), model_name="m", model_version="1", manifest=MODEL
    )
    header, outputs = _parse_response(body, headers)
    assert [o["name"] for o in header["outputs"]] == ["label"] and list(outputs) == ["label"]


def test_binary_data_output_makes_every_output_binary_unless_overridden() -> None:
    params = {"binary_data_output": True, "priority": 2}
    req = _decode_json({"inputs": _model_inputs(), "parameters": params})
    assert req.binary_outputs == frozenset({"scores", "label"})
    assert req.parameters == {"priority": 2}

    body, headers = encode_response(
        req, _model_outputs(), model_name="m", model_version="1", manifest=MODEL
    )
    header, outputs = _parse_response(body, headers)
    assert all("data" not in o for o in header["outputs"])
    _assert_same(outputs["scores"], _model_outputs()["scores"])
    _assert_same(outputs["label"], _model_outputs()["label"])

    mixed = _decode_json(
        {
            "inputs": _model_inputs(),
            "parameters": params,
            "outputs": [
                {"name": "scores", "parameters": {"binary_data": False}},
                {"name": "label"},
            ],
        }
    )
    assert mixed.binary_outputs == frozenset({"label"})


def test_request_parameters_are_passed_on() -> None:
    req = _decode_json({"inputs": _model_inputs(), "parameters": {"timeout": 5, "tag": "a"}})
    assert req.parameters == {"timeout": 5, "tag": "a"}
    assert _decode_json({"inputs": _model_inputs()}).parameters == {}


def test_id_is_echoed_and_absent_when_not_given() -> None:
    req = _decode_json({"id": "req-42", "inputs": _model_inputs()})
    assert req.id == "req-42"
    body, _ = encode_response(
        req, _model_outputs(), model_name="m", model_version="1", manifest=MODEL
    )
    assert orjson.loads(body)["id"] == "req-42"
    req = _decode_json({"inputs": _model_inputs()})
    body, _ = encode_response(
        req, _model_outputs(), model_name="m", model_version="1", manifest=MODEL
    )
    assert "id" not in orjson.loads(body) and "parameters" not in orjson.loads(body)


def test_outputs_are_made_contiguous_little_endian_of_the_manifest_dtype() -> None:
    req = _decode_json(
        {"inputs": _model_inputs(rows=2), "parameters": {"binary_data_output": True}}
    )
    want = np.arange(6, dtype=np.float32).reshape(2, 3)
    odd = {
        "scores": np.asfortranarray(want.astype(">f8")),  # big-endian, float64, Fortran order
        "label": np.arange(4, dtype=np.int32)[::2],  # strided, int32
    }
    body, headers = encode_response(req, odd, model_name="m", model_version="1", manifest=MODEL)
    header, outputs = _parse_response(body, headers)
    _assert_same(outputs["scores"], want)
    _assert_same(outputs["label"], np.array([0, 2], dtype=np.int64))
    assert [o["datatype"] for o in header["outputs"]] == ["FP32", "INT64"]

    req = _decode_json({"inputs": _model_inputs(rows=2)})
    body, headers = encode_response(req, odd, model_name="m", model_version="1", manifest=MODEL)
    _, outputs = _parse_response(body, headers)
    _assert_same(outputs["scores"], want)


def test_bytes_outputs_accept_str_and_bytes() -> None:
    manifest = _typed("BYTES", batched=False)
    req = _decode_json({"inputs": [_json_input("x", "BYTES", _sample("BYTES", (2, 3)))]}, manifest)
    y = np.array([["a", b"b", "\u00e9"], [b"", "x", b"y"]], dtype=object)
    want = np.array([[b"a", b"b", b"\xc3\xa9"], [b"", b"x", b"y"]], dtype=object)
    for binary in (False, True):
        req.binary_outputs = frozenset({"y"}) if binary else frozenset()
        body, headers = encode_response(
            req, {"y": y}, model_name="m", model_version="1", manifest=manifest
        )
        _, outputs = _parse_response(body, headers)
        _assert_same(outputs["y"], want)


def test_non_utf8_bytes_cannot_go_back_as_json() -> None:
    manifest = _typed("BYTES", batched=False)
    req = _decode_json({"inputs": [_json_input("x", "BYTES", _sample("BYTES", (2, 3)))]}, manifest)
    y = np.full((2, 3), b"\xff", dtype=object)
    with pytest.raises(InvalidInput, match=r"'y'.*binary_data"):
        encode_response(req, {"y": y}, model_name="m", model_version="1", manifest=manifest)


def test_a_missing_or_unconvertible_output_is_an_inference_failure() -> None:
    req = _decode_json({"inputs": _model_inputs()})
    with pytest.raises(InferenceFailed, match="label"):
        encode_response(
            req,
            {"scores": np.zeros((1, 3), np.float32)},
            model_name="m",
            model_version="1",
            manifest=MODEL,
        )
    with pytest.raises(InferenceFailed, match="scores"):
        encode_response(
            req,
            {"scores": np.array([["a", "b", "c"]]), "label": np.zeros(1, np.int64)},
            model_name="m",
            model_version="1",
            manifest=MODEL,
        )


# ----------------------------------------------------------------------------- batching


def test_batch_size_is_dim_0_and_must_agree() -> None:
    assert _decode_json({"inputs": _model_inputs(rows=3)}).batch_size == 3
    inputs = _model_inputs(rows=2)
    inputs[1] = _json_input("count", "INT32", np.zeros((3, 1), np.int32))
    message = _invalid(orjson.dumps({"inputs": inputs}))
    assert "count" in message and "image" in message and "batch" in message


def test_batch_over_the_limit_says_the_limit() -> None:
    body = orjson.dumps({"inputs": _model_inputs(rows=5)})
    assert "max batch size of 4" in _invalid(body)
    assert "max batch size of 2" in _invalid(
        orjson.dumps({"inputs": _model_inputs(rows=3)}), max_batch_size=2
    )
    assert decode_request(body, MODEL, max_batch_size=8).batch_size == 5


def test_a_model_without_batching_has_batch_size_1() -> None:
    manifest = _typed("INT8", batched=False)
    req = _decode_json(
        {"inputs": [_json_input("x", "INT8", _sample("INT8", (2, 3)))]}, manifest, max_batch_size=1
    )
    assert req.batch_size == 1 and req.inputs["x"].shape == (2, 3)
    message = _invalid(
        orjson.dumps({"inputs": [_json_input("x", "INT8", _sample("INT8"))]}), manifest
    )
    assert "'x'" in message and "shape" in message


# ----------------------------------------------------------------------------- bad requests


def _with(index: int, **changes: Any) -> JSONDict:
    """A valid MODEL request with input ``index`` changed (a value of None deletes the key)."""
    inputs = _model_inputs()
    for key, value in changes.items():
        if value is None:
            del inputs[index][key]
        else:
            inputs[index][key] = value
    return {"inputs": inputs}


_BAD_JSON: list[tuple[str, Any, list[str]]] = [
    ("not an object", [1, 2], ["object"]),
    ("inputs missing", {"id": "a"}, ["inputs"]),
    ("inputs not a list", {"inputs": {"name": "image"}}, ["inputs"]),
    ("inputs empty", {"inputs": []}, ["inputs"]),
    ("input not an object", {"inputs": ["image"]}, ["inputs"]),
    ("input without name", _with(0, name=None), ["name"]),
    ("unknown input", _with(0, name="pixels"), ["pixels"]),
    (
        "duplicate input",
        {"inputs": [*_model_inputs(), _model_inputs()[0]]},
        ["image", "more than once"],
    ),
    ("missing input", {"inputs": _model_inputs()[:1]}, ["count", "missing"]),
    ("wrong datatype", _with(0, datatype="FP64"), ["image", "datatype", "FP32"]),
    ("datatype missing", _with(0, datatype=None), ["image", "datatype"]),
    ("shape missing", _with(0, shape=None), ["image", "shape"]),
    ("shape not a list", _with(0, shape="1,2,2"), ["image", "shape"]),
    ("too few dims", _with(0, shape=[1, 4]), ["image", "shape"]),
    ("fixed dim differs", _with(0, shape=[1, 2, 3]), ["image", "shape"]),
    ("zero batch", _with(0, shape=[0, 2, 2], data=[]), ["image", "shape"]),
    ("negative dim", _with(0, shape=[-1, 2, 2]), ["image", "shape"]),
    ("float dim", _with(0, shape=[1.0, 2, 2]), ["image", "shape"]),
    ("bool dim", _with(1, shape=[True, 1]), ["count", "shape"]),
    ("too few elements", _with(0, data=[1.0, 2.0, 3.0]), ["image", "3", "4"]),
    ("too many elements", _with(1, data=[1, 2]), ["count", "2"]),
    ("data not a list", _with(0, data=1.0), ["image", "data"]),
    ("no data", _with(0, data=None), ["image", "data"]),
    ("ragged nested data", _with(0, data=[[1.0, 2.0], [3.0]]), ["image", "nested"]),
    ("nested data of another shape", _with(0, data=[[[1.0, 2.0, 3.0, 4.0]]]), ["image", "nested"]),
    ("mixed nesting", _with(0, data=[1.0, [2.0], 3.0, 4.0]), ["image"]),
    ("strings for FP32", _with(0, data=["1", "2", "3", "4"]), ["image", "FP32"]),
    ("null for FP32", _with(0, data=[1.0, None, 3.0, 4.0]), ["image", "FP32"]),
    ("object for FP32", _with(0, data=[1.0, {}, 3.0, 4.0]), ["image", "FP32"]),
    ("FP32 overflow", _with(0, data=[1.0, 1e39, 3.0, 4.0]), ["image", "range"]),
    ("fraction for INT32", _with(1, data=[1.5]), ["count", "INT32"]),
    ("INT32 overflow", _with(1, data=[2**31]), ["count", "INT32"]),
    (
        "both data and binary_data_size",
        _with(0, parameters={"binary_data_size": 16}),
        ["image", "both"],
    ),
    (
        "binary_data_size without binary part",
        _with(0, data=None, parameters={"binary_data_size": 16}),
        ["image", HEADER_LENGTH],
    ),
    ("input parameters not an object", _with(0, parameters=[1]), ["image", "parameters"]),
    (
        "shared memory",
        _with(0, data=None, parameters={"shared_memory_region": "r"}),
        ["image", "shared memory"],
    ),
    ("id not a string", {"id": 7, "inputs": _model_inputs()}, ["id"]),
    ("parameters not an object", {"parameters": [], "inputs": _model_inputs()}, ["parameters"]),
    (
        "binary_data_output not a bool",
        {"parameters": {"binary_data_output": 1}, "inputs": _model_inputs()},
        ["binary_data_output"],
    ),
    ("outputs not a list", {"inputs": _model_inputs(), "outputs": "label"}, ["outputs"]),
    ("output without name", {"inputs": _model_inputs(), "outputs": [{}]}, ["outputs", "name"]),
    (
        "unknown output",
        {"inputs": _model_inputs(), "outputs": [{"name": "probabilities"}]},
        ["probabilities"],
    ),
    (
        "duplicate output",
        {"inputs": _model_inputs(), "outputs": [{"name": "label"}] * 2},
        ["label", "more than once"],
    ),
    (
        "binary_data not a bool",
        {
            "inputs": _model_inputs(),
            "outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}],
        },
        ["label", "binary_data"],
    ),
    (
        "classification",
        {
            "inputs": _model_inputs(),
            "outputs": [{"name": "label", "parameters": {"classification": 3}}],
        },
        ["label", "classification"],
    ),
]


@pytest.mark.parametrize(
    ("request_body", "fragments"),
    [(b, f) for _, b, f in _BAD_JSON],
    ids=[i for i, _, _ in _BAD_JSON],
)
def test_bad_json_request_is_invalid_input(request_body: Any, fragments: list[str]) -> None:
    message = _invalid(orjson.dumps(request_body))
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message


@pytest.mark.parametrize("body", [b"", b"{", b"nan", b"\xff\xfe", b'{"inputs": [}', b"{} trailing"])
def test_body_that_is_not_json_is_invalid_input(body: bytes) -> None:
    assert "json" in _invalid(body).lower()


def _binary_model_body(
    image_size: int | None = None, extra: bytes = b"", cut: int = 0
) -> tuple[bytes, int]:
    image = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    entry, raw = _binary_input("image", "FP32", image)
    if image_size is not None:
        entry["parameters"]["binary_data_size"] = image_size
    body, length = _binary_body({"inputs": [entry, _model_inputs()[1]]}, [raw + extra])
    return body[: len(body) - cut], length


def test_binary_sizes_must_account_for_every_byte() -> None:
    body, length = _binary_model_body()
    assert decode_request(body, MODEL, header_length=length).inputs["image"].shape == (1, 2, 2)

    body, length = _binary_model_body(cut=4)  # truncated body
    message = _invalid(body, header_length=length)
    assert "image" in message and "left" in message
    body, length = _binary_model_body(extra=b"\0\0\0\0")  # leftover bytes
    message = _invalid(body, header_length=length)
    assert "image" in message and "4 bytes" in message
    body, length = _binary_model_body(image_size=12, extra=b"")  # size not prod(shape) * 4
    message = _invalid(body, header_length=length)
    assert "image" in message and "16" in message
    body, length = _binary_model_body(image_size=-16)
    assert "image" in _invalid(body, header_length=length)
    body, length = _binary_model_body(image_size=True)
    assert "image" in _invalid(body, header_length=length)


def test_bytes_after_a_json_only_header_are_refused() -> None:
    head = orjson.dumps({"inputs": _model_inputs()})
    assert "JSON header" in _invalid(head + b"junk", header_length=len(head))


@pytest.mark.parametrize("delta", [1, 1000])
def test_header_length_past_the_body_is_a_truncated_body(delta: int) -> None:
    body, _ = _binary_model_body()
    assert "truncated" in _invalid(body, header_length=len(body) + delta)
    assert "truncated" in _invalid(body, header_length=-1)


def test_a_header_length_cutting_the_json_is_invalid_json() -> None:
    body, length = _binary_model_body()
    assert "json" in _invalid(body, header_length=length - 3).lower()


def test_bool_binary_bytes_must_be_0_or_1() -> None:
    manifest = _manifest([("b", "BOOL", [2])], [("y", "BOOL", [2])], 0)
    header = {
        "inputs": [
            {"name": "b", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}
        ]
    }
    body, length = _binary_body(header, [b"\x01\x02"])
    assert "'b'" in _invalid(body, manifest, header_length=length)
    body, length = _binary_body(header, [b"\x01\x00"])
    assert decode_request(body, manifest, header_length=length).inputs["b"].tolist() == [
        True,
        False,
    ]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (struct.pack("<I", 1) + b"abcd", "ends after 1"),  # 1 element of 2
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 9) + b"b", "runs past"),
        (struct.pack("<I", 0) * 2 + b"\0", "left over"),
        (b"\0\0", "too small"),
    ],
)
def test_malformed_binary_bytes_tensor(payload: bytes, fragment: str) -> None:
    manifest = _manifest([("s", "BYTES", [2])], [("y", "BYTES", [2])], 0)
    header = {
        "inputs": [
            {
                "name": "s",
                "shape": [2],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(payload)},
            }
        ]
    }
    body, length = _binary_body(header, [payload])
    message = _invalid(body, manifest, header_length=length)
    assert "'s'" in message and fragment in message


def test_bytes_json_data_must_be_strings() -> None:
    manifest = _manifest([("s", "BYTES", [2])], [("y", "BYTES", [2])], 0)
    body = orjson.dumps(
        {"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "data": ["a", 1]}]}
    )
    assert "'s'" in _invalid(body, manifest)


@pytest.mark.parametrize(
    ("datatype", "literal"),
    [
        ("UINT8", "256"),
        ("UINT8", "-1"),
        ("INT8", "-129"),
        ("UINT64", "-1"),
        ("UINT64", "18446744073709551616"),
        ("INT64", "9223372036854775808"),
        ("INT64", "-9223372036854775809"),
        ("INT16", "1.0"),
        ("FP16", "70000.0"),
        ("FP64", "1e400"),
        ("BOOL", "2"),
        ("BOOL", '"true"'),
    ],
)
def test_values_out_of_range_for_the_datatype(datatype: str, literal: str) -> None:
    manifest = _manifest([("v", datatype, [1])], [("y", datatype, [1])], 0)
    tensor = f'{{"name": "v", "shape": [1], "datatype": "{datatype}", "data": [{literal}]}}'
    message = _invalid(f'{{"inputs": [{tensor}]}}'.encode(), manifest)
    assert "'v'" in message or "JSON" in message  # 1e400 is not a JSON double


@pytest.mark.parametrize("datatype", ["FP32", "INT32", "UINT8"])
@pytest.mark.parametrize("literal", ["true", "false", " false ", "true\n"])
@pytest.mark.parametrize("request_id", ["", "u" * 100, "full-null-ull" * 20])
def test_json_booleans_are_refused_for_numeric_inputs(
    datatype: str, literal: str, request_id: str
) -> None:
    # Request ids and names full of the letters of true and false change nothing.
    manifest = _manifest([("value_ull", datatype, [3])], [("y", datatype, [3])], 0)
    tensor = f'{{"name": "value_ull", "shape": [3], "datatype": "{datatype}", "data": '
    ok = f'{{"id": "{request_id}", "inputs": [{tensor}[1, 0, 1]}}]}}'.encode()
    assert decode_request(ok, manifest).inputs["value_ull"].tolist() == [1, 0, 1]
    bad = f'{{"id": "{request_id}", "inputs": [{tensor}[1, {literal}, 0]}}]}}'.encode()
    message = _invalid(bad, manifest)
    assert message.startswith("input 'value_ull': 'data' holds true/false")


def test_integer_extremes_are_accepted() -> None:
    manifest = _manifest([("v", "UINT64", [1])], [("y", "UINT64", [1])], 0)
    tensor = b'{"name": "v", "shape": [1], "datatype": "UINT64", "data": [18446744073709551615]}'
    body = b'{"inputs": [' + tensor + b"]}"
    assert decode_request(body, manifest).inputs["v"].tolist() == [2**64 - 1]


# ----------------------------------------------------------------------------- fuzz

_JUNK: list[Any] = [
    None,
    True,
    -1,
    0,
    2**63,
    1.5,
    "",
    "x",
    "FP32",
    [],
    [1],
    [[1]],
    {},
    {"a": 1},
    [-1, 2, 2],
]


def _mutate_tree(node: Any, rng: random.Random) -> Any:
    """``node`` with one randomly chosen value (or key) replaced by junk."""
    if isinstance(node, dict) and node and rng.random() < 0.85:
        key = rng.choice(list(node))
        mapping = dict(node)
        if rng.random() < 0.15:
            del mapping[key]
        else:
            mapping[key] = _mutate_tree(node[key], rng)
        return mapping
    if isinstance(node, list) and node and rng.random() < 0.85:
        i = rng.randrange(len(node))
        items = list(node)
        roll = rng.random()
        if roll < 0.1:
            del items[i]
        elif roll < 0.2:
            items.append(items[i])
        else:
            items[i] = _mutate_tree(node[i], rng)
        return items
    return rng.choice(_JUNK)


def _mutate_bytes(body: bytes, rng: random.Random) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        pos = rng.randrange(len(data) + 1)
        if roll < 0.4 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif roll < 0.7:
            del data[pos : pos + rng.randint(1, 8)]
        else:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(data)


FUZZ_MODEL = _manifest(
    [
        ("f", "FP16", [-1, 3]),
        ("s", "BYTES", [-1, 2]),
        ("b", "BOOL", [-1]),
        ("u", "UINT32", [-1, 1]),
    ],
    [("y", "FP32", [-1])],
)


def _fuzz_request() -> tuple[JSONDict, JSONDict, list[bytes]]:
    """A valid FUZZ_MODEL request, as JSON, and as a binary header with its payloads."""
    arrays = {
        "f": ("FP16", np.array([[0.5, -1, 2]], np.float16)),
        "s": ("BYTES", np.array([[b"ab", b""]], dtype=object)),
        "b": ("BOOL", np.array([True])),
        "u": ("UINT32", np.array([[9]], np.uint32)),
    }
    inputs = [_json_input(n, d, a) for n, (d, a) in arrays.items()]
    binary = [_binary_input(n, d, a) for n, (d, a) in arrays.items()]
    outputs = [{"name": "y", "parameters": {"binary_data": True}}]
    return (
        {"id": "f", "inputs": inputs, "outputs": outputs},
        {"inputs": [e for e, _ in binary], "parameters": {"binary_data_output": True}},
        [r for _, r in binary],
    )


def _accepted(body: bytes, header_length: int | None = None) -> bool:
    """Whether FUZZ_MODEL accepts ``body``; any error but InvalidInput fails the test."""
    try:
        decode_request(body, FUZZ_MODEL, header_length=header_length)
    except InvalidInput:
        return False
    return True


def test_fuzzed_requests_only_ever_raise_invalid_input() -> None:
    rng = random.Random(1234)
    json_request, header, payloads = _fuzz_request()
    body = orjson.dumps(json_request)
    bin_body, length = _binary_body(header, payloads)
    assert _accepted(body) and _accepted(bin_body, length)
    accepted = 0
    for _ in range(1500):
        accepted += _accepted(orjson.dumps(_mutate_tree(json_request, rng)))
        accepted += _accepted(_mutate_bytes(body, rng))
        head = orjson.dumps(_mutate_tree(header, rng))
        accepted += _accepted(head + b"".join(payloads), len(head))
        raw = _mutate_bytes(bin_body, rng)
        accepted += _accepted(raw, rng.choice([length, length - 1, length + 3, len(raw)]))
    assert 0 < accepted < 6000  # some mutations stay valid, most do not


# ----------------------------------------------------------------------------- tritonclient


_INTEROP = ["FP32", "FP16", "FP64", "INT8", "INT64", "UINT16", "UINT64", "BOOL", "BYTES"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", _INTEROP)
def test_tritonclient_request_and_response(datatype: str, binary: bool) -> None:
    manifest = _typed(datatype)
    x = _sample(datatype, binary=binary)
    infer_input = triton.InferInput("x", list(x.shape), datatype)
    infer_input.set_data_from_numpy(x, binary_data=binary)
    requested = [triton.InferRequestedOutput("y", binary_data=binary)]
    body, header_length = triton.InferenceServerClient.generate_request_body(
        [infer_input], outputs=requested, request_id="tc-1"
    )
    assert (header_length is not None) == binary

    req = decode_request(body, manifest, header_length=header_length)
    assert req.id == "tc-1" and req.binary_outputs == (frozenset({"y"}) if binary else frozenset())
    _assert_same(req.inputs["x"], x)

    content, headers = encode_response(
        req, {"y": req.inputs["x"]}, model_name="m", model_version="1", manifest=manifest
    )
    length = headers.get(HEADER_LENGTH)
    result = triton.InferResult.from_response_body(
        content, verbose=False, header_length=None if length is None else int(length)
    )
    assert result.get_response()["id"] == "tc-1"
    got = result.as_numpy("y")
    if datatype == "BYTES" and not binary:  # tritonclient reads JSON BYTES as str
        got = np.array([s.encode() for s in got.reshape(-1)], dtype=object).reshape(got.shape)
    _assert_same(got, x)


def test_tritonclient_default_outputs_come_back_binary() -> None:
    x = np.arange(784, dtype=np.float32).reshape(1, 1, 28, 28) / 784
    infer_input = triton.InferInput("input", [1, 1, 28, 28], "FP32")
    infer_input.set_data_from_numpy(x)
    body, header_length = triton.InferenceServerClient.generate_request_body([infer_input])
    req = decode_request(body, DIGITS, header_length=header_length)
    assert req.binary_outputs == frozenset({"logits"}) and req.parameters == {}
    logits = x.reshape(1, -1)[:, :10] * 2
    content, headers = encode_response(
        req, {"logits": logits}, model_name="digits", model_version="2", manifest=DIGITS
    )
    result = triton.InferResult.from_response_body(
        content, header_length=int(headers[HEADER_LENGTH])
    )
    _assert_same(result.as_numpy("logits"), logits)
    assert result.get_response()["model_version"] == "2"
