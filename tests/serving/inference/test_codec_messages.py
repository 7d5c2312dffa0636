"""What the codec's error messages say: the values they name (found by mutation testing)."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
import pytest

from model_store.manifest import Artifact, ModelManifest, TensorSpec
from serving.errors import InferenceFailed, InvalidInput
from serving.inference.codec import decode_request, encode_response


def _manifest(datatype: str) -> ModelManifest:
    """One input ``x`` and one output ``y`` of ``datatype``, shape [2]."""
    return ModelManifest(
        name="m",
        version=1,
        platform="onnx",
        inputs=[TensorSpec(name="x", datatype=datatype, shape=[2])],  # type: ignore[arg-type]
        outputs=[TensorSpec(name="y", datatype=datatype, shape=[2])],  # type: ignore[arg-type]
        max_batch_size=0,
        artifacts=[Artifact(file="model.onnx", sha256="0" * 64, size=1, target="onnxruntime")],
    )


def _unknown_input_error(name: str) -> str:
    body = {"inputs": [{"name": name, "shape": [2], "datatype": "FP32", "data": [1, 2]}]}
    with pytest.raises(InvalidInput) as raised:
        decode_request(orjson.dumps(body), _manifest("FP32"))
    return str(raised.value)


def test_a_client_sent_name_is_echoed_whole_up_to_80_characters() -> None:
    name = "n" * 78  # repr: 80 characters
    assert f"unknown input {name!r}:" in _unknown_input_error(name)


def test_a_longer_client_sent_name_is_cut_to_77_characters_and_dots() -> None:
    name = "n" * 79  # repr: 81 characters
    error = _unknown_input_error(name)
    assert f"unknown input {repr(name)[:77]}...:" in error
    assert name not in error


def test_binary_bytes_left_over_are_counted() -> None:
    raw = b"".join(struct.pack("<I", len(v)) + v for v in (b"ab", b"c")) + b"xyz"
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    )
    with pytest.raises(InvalidInput, match="'x': 3 bytes left over after 2 binary BYTES"):
        decode_request(header + raw, _manifest("BYTES"), header_length=len(header))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_bytes_output_holding_a_number_names_the_output_and_type(binary: bool) -> None:
    manifest = _manifest("BYTES")
    body = {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}
    request = decode_request(orjson.dumps(body), manifest)
    request.binary_outputs = frozenset({"y"}) if binary else frozenset()
    y = np.array([b"fine", 7], dtype=np.object_)
    with pytest.raises(InferenceFailed, match="output 'y' holds a int, not bytes or str"):
        encode_response(request, {"y": y}, model_name="m", model_version="1", manifest=manifest)


def _three_inputs() -> ModelManifest:
    """Inputs ``a`` (FP32), ``b`` (INT64) and ``c`` (FP32), outputs ``y`` and ``z``, rows <= 4."""
    return ModelManifest(
        name="m",
        version=1,
        platform="onnx",
        inputs=[
            TensorSpec(name="a", datatype="FP32", shape=[-1, 2]),
            TensorSpec(name="b", datatype="INT64", shape=[-1, 2]),
            TensorSpec(name="c", datatype="FP32", shape=[-1, 2]),
        ],
        outputs=[
            TensorSpec(name="y", datatype="FP32", shape=[-1, 2]),
            TensorSpec(name="z", datatype="BYTES", shape=[-1]),
        ],
        max_batch_size=4,
        artifacts=[Artifact(file="model.onnx", sha256="0" * 64, size=1, target="onnxruntime")],
    )


def _input(name: str, rows: int = 1, **fields: object) -> dict[str, object]:
    datatype = "INT64" if name == "b" else "FP32"
    entry: dict[str, object] = {"name": name, "shape": [rows, 2], "datatype": datatype}
    entry["data"] = [1] * (2 * rows)
    return entry | fields


_ALL = [_input("a"), _input("b"), _input("c")]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1], "request body must be a JSON object"),
        ({"id": 5, "inputs": _ALL}, "request 'id' must be a string"),
        ({"parameters": [], "inputs": _ALL}, "request 'parameters' must be a JSON object"),
        (
            {"parameters": {"binary_data_output": "yes"}, "inputs": _ALL},
            "request parameter 'binary_data_output' must be a boolean",
        ),
        ({"inputs": []}, "request 'inputs' must be a non-empty list"),
        ({"inputs": [5]}, "each of request 'inputs' must be a JSON object"),
        ({"inputs": [{"shape": [1, 2]}]}, "each of request 'inputs' needs a string 'name'"),
        (
            {"inputs": [_input("d")]},
            "unknown input 'd': the model's inputs are 'a', 'b', 'c'",
        ),
        ({"inputs": [_input("a")]}, "missing input(s) 'b', 'c'"),
        (
            {"inputs": [_input("a", datatype="INT8"), *_ALL[1:]]},
            "input 'a': datatype 'INT8' does not match the model's FP32",
        ),
        (
            {"inputs": [_input("a", shape=[1, 3], data=[1, 2, 3]), *_ALL[1:]]},
            "input 'a': shape [1, 3] does not match the model's [-1, 2] (-1 is any positive size)",
        ),
        (
            {"inputs": [_input("a", shape=[2], data=[1, 2]), *_ALL[1:]]},
            "input 'a': shape [2] does not match the model's [-1, 2]",
        ),
        (
            {"inputs": [_input(n, rows=5) for n in "abc"]},
            "input 'a': batch of 5 is over the max batch size of 4",
        ),
        ({"inputs": _ALL, "outputs": 5}, "request 'outputs' must be a list"),
        (
            {"inputs": _ALL, "outputs": [{"x": 1}]},
            "each of request 'outputs' must be an object with a string 'name'",
        ),
        (
            {"inputs": _ALL, "outputs": [{"name": "q"}]},
            "unknown output 'q': the model's outputs are 'y', 'z'",
        ),
        (
            {"inputs": _ALL, "outputs": [{"name": "y", "parameters": []}]},
            "output 'y': 'parameters' must be a JSON object",
        ),
        (
            {
                "inputs": _ALL,
                "outputs": [{"name": "y", "parameters": {"shared_memory_region": "r"}}],
            },
            "output 'y': shared memory outputs are not supported",
        ),
    ],
)
def test_each_malformed_request_gets_its_own_whole_message(body: object, message: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        decode_request(orjson.dumps(body), _three_inputs())
    assert raised.value.message == message


def test_a_batch_at_the_limit_is_accepted() -> None:
    request = decode_request(
        orjson.dumps({"inputs": [_input(n, rows=4) for n in "abc"]}), _three_inputs()
    )
    assert {name: x.shape for name, x in request.inputs.items()} == {n: (4, 2) for n in "abc"}
    assert request.inputs["a"].dtype == np.float32  # JSON integers, as the model's FP32


def _binary(name: str, values: np.ndarray, **fields: object) -> dict[str, object]:
    datatype = "INT64" if name == "b" else "FP32"
    entry = {"name": name, "shape": list(values.shape), "datatype": datatype}
    return entry | {"parameters": {"binary_data_size": values.nbytes}} | fields


@pytest.mark.parametrize("binary_inputs", [0, 3], ids=["json", "binary"])
def test_bytes_left_over_are_counted_and_placed(binary_inputs: int) -> None:
    arrays: dict[str, np.ndarray] = {"a": np.ones((1, 2), np.float32)}
    arrays["b"] = np.ones((1, 2), np.int64)
    arrays["c"] = np.ones((1, 2), np.float32)
    if binary_inputs:
        inputs = [_binary(n, x) for n, x in arrays.items()]
        raw = b"".join(x.tobytes() for x in arrays.values())
        where = "after binary input 'c'"
    else:
        inputs, raw, where = _ALL, b"", "after the JSON header"
    header = orjson.dumps({"inputs": inputs})
    with pytest.raises(InvalidInput) as raised:
        decode_request(header + raw + b"xyz", _three_inputs(), header_length=len(header))
    assert raised.value.message == (
        f"3 bytes of binary data {where} are not accounted for by any input's binary_data_size"
    )
    # Without the extra bytes, the same body decodes.
    request = decode_request(header + raw, _three_inputs(), header_length=len(header))
    assert set(request.inputs) == {"a", "b", "c"}


@pytest.mark.parametrize(
    ("sizes", "raw_bytes", "message"),
    [
        (
            {"b": 16},
            16,
            "input 'b': binary_data_size is 16 but only 8 bytes of binary data are left",
        ),
        ({"a": 0}, 24, "input 'a': binary_data_size is 0 but shape [1, 2] of FP32 needs 8 bytes"),
        ({"a": -1}, 32, "input 'a': binary_data_size must be a non-negative integer"),
        ({"a": 8.0}, 32, "input 'a': binary_data_size must be a non-negative integer"),
    ],
)
def test_binary_sizes_that_do_not_fit(sizes: dict[str, int], raw_bytes: int, message: str) -> None:
    arrays: dict[str, np.ndarray] = {"a": np.ones((1, 2), np.float32)}
    arrays["b"] = np.ones((1, 2), np.int64)
    arrays["c"] = np.ones((1, 2), np.float32)
    inputs = [
        _binary(n, x, parameters={"binary_data_size": sizes.get(n, x.nbytes)})
        for n, x in arrays.items()
    ]
    header = orjson.dumps({"inputs": inputs})
    raw = b"".join(x.tobytes() for x in arrays.values())[:raw_bytes]
    with pytest.raises(InvalidInput) as raised:
        decode_request(header + raw, _three_inputs(), header_length=len(header))
    assert raised.value.message == message


def test_a_header_length_of_zero_is_an_empty_json_header_not_a_truncated_body() -> None:
    header = orjson.dumps({"inputs": _ALL})
    with pytest.raises(InvalidInput) as raised:
        decode_request(header, _three_inputs(), header_length=0)
    assert raised.value.message.startswith("request body is not valid JSON: ")
    with pytest.raises(InvalidInput) as raised:
        decode_request(header, _three_inputs(), header_length=-1)
    assert raised.value.message == (
        f"truncated body: inference-header-content-length is -1 but the body has "
        f"{len(header)} bytes"
    )


def test_a_body_in_a_memoryview_of_another_shape_decodes_alike() -> None:
    header = orjson.dumps({"inputs": _ALL})
    as_rows = memoryview(header).cast("B", (1, len(header)))  # "B", 2 dimensions
    request = decode_request(as_rows, _three_inputs(), header_length=len(header))
    np.testing.assert_array_equal(request.inputs["b"], np.ones((1, 2), np.int64))


def test_a_signature_is_never_taken_from_another_manifest() -> None:
    # Signatures are cached by the manifest's id(); a manifest freed and replaced by another
    # at the same address must not get the first one's signature.
    for i in range(50):
        manifest = _manifest("FP32").model_copy(
            update={"inputs": [TensorSpec(name=f"x{i}", datatype="FP32", shape=[2])]}
        )
        body = {"inputs": [{"name": f"x{i}", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}
        assert set(decode_request(orjson.dumps(body), manifest).inputs) == {f"x{i}"}
        del manifest


def _encode(
    outputs: dict[str, Any], requested: list[dict[str, Any]] | None = None, **parameters: object
) -> dict[str, Any]:
    manifest = _three_inputs()
    body: dict[str, Any] = {"inputs": _ALL}
    if parameters:
        body["parameters"] = parameters
    if requested is not None:
        body["outputs"] = requested
    request = decode_request(orjson.dumps(body), manifest)
    content, headers = encode_response(
        request,
        outputs,
        model_name="m",
        model_version="1",
        manifest=manifest,
    )
    if "inference-header-content-length" in headers:
        content = content[: int(headers["inference-header-content-length"])]
    answer: dict[str, Any] = orjson.loads(content)
    return answer


def test_every_output_is_encoded_whatever_comes_first() -> None:
    # A BYTES output given as a list, asked for before a numeric one: both are answered.
    requested = [{"name": "z"}, {"name": "y"}]
    answer = _encode({"z": [b"ab", "c"], "y": np.ones((1, 2), np.float64)}, requested)
    assert [o["name"] for o in answer["outputs"]] == ["z", "y"]
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["z"]["data"] == ["ab", "c"] and outputs["z"]["shape"] == [2]
    assert outputs["y"]["data"] == [1.0, 1.0] and outputs["y"]["datatype"] == "FP32"


def test_a_numeric_output_given_as_a_list_is_encoded() -> None:
    answer = _encode({"y": [[1, 2]], "z": np.array([b"a"], np.object_)})
    y = next(o for o in answer["outputs"] if o["name"] == "y")
    assert (y["datatype"], y["shape"], y["data"]) == ("FP32", [1, 2], [1.0, 2.0])


def test_an_output_the_model_did_not_produce_is_named() -> None:
    with pytest.raises(InferenceFailed) as raised:
        _encode({"y": np.ones((1, 2), np.float32)})
    assert raised.value.message == "the model produced no output 'z'"


@pytest.mark.parametrize(
    "requested", [None, [{"name": "y"}, {"name": "z", "parameters": {}}]], ids=["all", "named"]
)
def test_binary_data_output_applies_to_outputs_that_do_not_say(
    requested: list[dict[str, Any]] | None,
) -> None:
    answer = _encode(
        {"y": np.ones((1, 2), np.float32), "z": np.array([b"a"], np.object_)},
        requested,
        binary_data_output=True,
    )
    assert len(answer["outputs"]) == 2
    for output in answer["outputs"]:
        assert "data" not in output and output["parameters"]["binary_data_size"] > 0


def test_an_output_beyond_the_datatype_range_is_cast_without_a_warning() -> None:
    # pytest turns warnings into errors here: numpy's overflow warning would fail this.
    answer = _encode({"y": np.full((1, 2), 1e300), "z": np.array([b"a"], np.object_)})
    y = next(o for o in answer["outputs"] if o["name"] == "y")
    assert y["shape"] == [1, 2] and y["datatype"] == "FP32"
