"""What the codec's error messages say: the values they name (found by mutation testing)."""

from __future__ import annotations

import struct

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
