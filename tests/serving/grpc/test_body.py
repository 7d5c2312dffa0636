"""A ModelInferRequest decoded and answered: raw and typed contents, the same checks and
messages as the HTTP codec, outputs always raw."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
import pytest

from model_store.manifest import Artifact, ModelManifest, TensorSpec
from serving.errors import InferenceFailed, InvalidInput
from serving.grpc._proto import grpc_service_pb2 as pb
from serving.grpc.body import GrpcInferBody
from serving.inference.codec import decode_request
from serving.inference.tensors import InferRequest


def _manifest(datatype: str = "FP32", shape: list[int] | None = None, batch: int = 8) -> Any:
    shape = shape or [-1, 2]
    return ModelManifest(
        name="m",
        version=3,
        platform="onnx",
        inputs=[TensorSpec(name="x", datatype=datatype, shape=shape)],  # type: ignore[arg-type]
        outputs=[
            TensorSpec(name="y", datatype=datatype, shape=shape),  # type: ignore[arg-type]
            TensorSpec(name="z", datatype="FP32", shape=[-1]),
        ],
        max_batch_size=batch,
        artifacts=[Artifact(file="model.onnx", sha256="0" * 64, size=1, target="onnxruntime")],
    )


def _tensor(name: str = "x", datatype: str = "FP32", shape: tuple[int, ...] = (1, 2)) -> Any:
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)


async def _decode(request: pb.ModelInferRequest, manifest: Any = None) -> InferRequest:
    return await GrpcInferBody(request).decode(manifest or _manifest(), 8)


async def _error(request: pb.ModelInferRequest, manifest: Any = None) -> str:
    with pytest.raises(InvalidInput) as raised:
        await _decode(request, manifest)
    return raised.value.message


async def test_raw_contents_are_viewed_not_copied() -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    request = pb.ModelInferRequest(
        inputs=[_tensor(shape=(3, 2))], raw_input_contents=[x.tobytes()], id="r-1"
    )
    req = await _decode(request)
    got = req.inputs["x"]
    assert np.array_equal(got, x) and req.batch_size == 3 and req.id == "r-1"
    assert not got.flags.writeable and not got.flags.owndata  # a view of the message's bytes
    assert req.outputs == ["y", "z"]


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("FP32", "fp32_contents", [0.5, -1.0]),
        ("FP64", "fp64_contents", [0.25, 2.0]),
        ("INT8", "int_contents", [-128, 127]),
        ("INT64", "int64_contents", [-(2**40), 2**40]),
        ("UINT16", "uint_contents", [0, 65535]),
        ("UINT64", "uint64_contents", [0, 2**64 - 1]),
        ("BOOL", "bool_contents", [True, False]),
        ("BYTES", "bytes_contents", [b"ab", b""]),
    ],
)
async def test_typed_contents_of_each_datatype(
    datatype: str, field: str, values: list[Any]
) -> None:
    tensor = _tensor(datatype=datatype)
    getattr(tensor.contents, field).extend(values)
    req = await _decode(pb.ModelInferRequest(inputs=[tensor]), _manifest(datatype))
    assert req.inputs["x"].reshape(-1).tolist() == values


async def test_typed_contents_out_of_range_are_refused() -> None:
    tensor = _tensor(datatype="INT8")
    tensor.contents.int_contents.extend([1, 300])
    message = await _error(pb.ModelInferRequest(inputs=[tensor]), _manifest("INT8"))
    assert "input 'x': contents is not valid INT8" in message


async def test_fp16_has_no_typed_contents() -> None:
    tensor = _tensor(datatype="FP16")
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    message = await _error(pb.ModelInferRequest(inputs=[tensor]), _manifest("FP16"))
    assert "FP16 has no typed contents: send it in raw_input_contents" in message


async def test_raw_bytes_tensors_carry_length_prefixes() -> None:
    raw = b"".join(struct.pack("<I", len(v)) + v for v in (b"hello", b"\x00\xff"))
    request = pb.ModelInferRequest(inputs=[_tensor(datatype="BYTES")], raw_input_contents=[raw])
    req = await _decode(request, _manifest("BYTES"))
    assert req.inputs["x"].tolist() == [[b"hello", b"\x00\xff"]]
    cut = pb.ModelInferRequest(inputs=[_tensor(datatype="BYTES")], raw_input_contents=[raw[:-1]])
    assert "runs past the data" in await _error(cut, _manifest("BYTES"))


async def test_raw_contents_for_some_inputs_only_are_refused() -> None:
    two = pb.ModelInferRequest(inputs=[_tensor(), _tensor("w")], raw_input_contents=[b"\0" * 8])
    message = await _error(two)
    assert message == (
        "raw_input_contents has 1 entries for 2 inputs: use it for every input or for none"
    )


async def test_contents_and_raw_together_or_neither_are_refused() -> None:
    both = _tensor()
    both.contents.fp32_contents.extend([1.0, 2.0])
    request = pb.ModelInferRequest(inputs=[both], raw_input_contents=[b"\0" * 8])
    assert await _error(request) == "input 'x' has both contents and raw_input_contents"
    neither = pb.ModelInferRequest(inputs=[_tensor()])
    assert await _error(neither) == "input 'x' has neither contents nor raw_input_contents"
    assert await _error(pb.ModelInferRequest()) == "the request has no inputs"


def _json_error(tensor: dict[str, Any]) -> str:
    with pytest.raises(InvalidInput) as raised:
        decode_request(orjson.dumps({"inputs": [tensor]}), _manifest(), max_batch_size=8)
    return raised.value.message


@pytest.mark.parametrize(
    ("name", "datatype", "shape"),
    [
        ("pixels", "FP32", [1, 2]),  # unknown input
        ("x", "INT32", [1, 2]),  # wrong datatype
        ("x", "FP32", [1, 3]),  # wrong shape
        ("x", "FP32", [2]),  # wrong rank
        ("x", "FP32", [9, 2]),  # over the max batch size
    ],
)
async def test_the_checks_shared_with_http_say_the_same(
    name: str, datatype: str, shape: list[int]
) -> None:
    count = int(np.prod(shape))
    tensor = _tensor(name, datatype, tuple(shape))
    tensor.contents.fp32_contents.extend([0.0] * count)
    http = _json_error({"name": name, "datatype": datatype, "shape": shape, "data": [0.0] * count})
    assert await _error(pb.ModelInferRequest(inputs=[tensor])) == http


async def test_a_raw_size_that_does_not_fit_the_shape_is_named() -> None:
    request = pb.ModelInferRequest(inputs=[_tensor()], raw_input_contents=[b"\0" * 7])
    assert await _error(request) == (
        "input 'x': raw_input_contents is 7 but shape [1, 2] of FP32 needs 8 bytes"
    )


async def test_requested_outputs_are_checked_and_kept_in_order() -> None:
    def request(*names: str, **params: pb.InferParameter) -> pb.ModelInferRequest:
        x = _tensor()
        x.contents.fp32_contents.extend([1.0, 2.0])
        outputs = [
            pb.ModelInferRequest.InferRequestedOutputTensor(name=n, parameters=params)
            for n in names
        ]
        return pb.ModelInferRequest(inputs=[x], outputs=outputs)

    assert (await _decode(request("z", "y"))).outputs == ["z", "y"]
    assert "unknown output 'probabilities'" in await _error(request("probabilities"))
    assert "output 'y' is requested more than once" in await _error(request("y", "y"))
    classify = {"classification": pb.InferParameter(int64_param=3)}
    assert "classification outputs are not supported" in await _error(request("y", **classify))


async def test_parameters_become_plain_values() -> None:
    x = _tensor()
    x.contents.fp32_contents.extend([1.0, 2.0])
    request = pb.ModelInferRequest(
        inputs=[x],
        parameters={
            "priority": pb.InferParameter(uint64_param=2),
            "timeout": pb.InferParameter(int64_param=5000),
            "user": pb.InferParameter(string_param="u-7"),
            "flag": pb.InferParameter(bool_param=True),
        },
    )
    req = await _decode(request)
    assert req.parameters == {"priority": 2, "timeout": 5000, "user": "u-7", "flag": True}


async def test_outputs_go_back_raw_with_id_and_version() -> None:
    x = _tensor()
    x.contents.fp32_contents.extend([1.0, 2.0])
    body = GrpcInferBody(pb.ModelInferRequest(inputs=[x], id="abc"))
    manifest = _manifest()
    req = await body.decode(manifest, 8)
    y = np.array([[1.5, 2.5]], np.float64)  # cast to the manifest's FP32
    response = body.encode(
        req,
        {"y": y, "z": np.array([7], np.int64)},
        model_name="m",
        model_version="3",
        manifest=manifest,
        location="local",
    )
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "abc")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("y", "FP32", [1, 2]),
        ("z", "FP32", [1]),
    ]
    assert response.raw_output_contents[0] == y.astype(np.float32).tobytes()
    with pytest.raises(InferenceFailed, match="the model produced no output 'z'"):
        body.encode(
            req, {"y": y}, model_name="m", model_version="3", manifest=manifest, location="local"
        )


async def test_bytes_outputs_are_length_prefixed() -> None:
    x = _tensor(datatype="BYTES")
    x.contents.bytes_contents.extend([b"a", b"b"])
    manifest = _manifest("BYTES")
    body = GrpcInferBody(
        pb.ModelInferRequest(
            inputs=[x], outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="y")]
        )
    )
    req = await body.decode(manifest, 8)
    y = np.array([["hé", b"\x00"]], dtype=np.object_)
    response = body.encode(
        req, {"y": y}, model_name="m", model_version="3", manifest=manifest, location="local"
    )
    assert response.raw_output_contents[0] == (
        struct.pack("<I", 3) + "hé".encode() + struct.pack("<I", 1) + b"\x00"
    )
