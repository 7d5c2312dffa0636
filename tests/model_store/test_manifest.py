"""The manifest models: name rules, tensor shapes, stored file names, unknown keys."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from model_store import Artifact, ModelManifest, StoredFile, TensorSpec, validate_model_name

SHA = "ab" * 32


def _manifest(**override: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "resnet",
        "version": 1,
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1000]}],
        "max_batch_size": 32,
        "artifacts": [
            {"file": "model.onnx", "sha256": SHA, "size": 10, "target": "onnxruntime"},
        ],
    }
    data.update(override)
    return data


@pytest.mark.parametrize("name", ["a", "resnet50", "my-model_v2.1", "A.b-c_d", "9lives", "m" * 128])
def test_good_model_names_pass(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "a..b", "a/b", "/abs", "a\\b", ".hidden", "-x", "_x", "m" * 129, "a\0b",
     "con/../x", "a b", "name\n", "mödel"],
)  # fmt: skip
def test_bad_model_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        validate_model_name(name)
    with pytest.raises(ValidationError, match="invalid model name"):
        ModelManifest.model_validate(_manifest(name=name))


@pytest.mark.parametrize("shape", [[], [1], [-1], [-1, 3, 224, 224], [8, 16]])
def test_shapes_with_positive_or_dynamic_dims_pass(shape: list[int]) -> None:
    assert TensorSpec(name="x", datatype="INT64", shape=shape).shape == shape


@pytest.mark.parametrize("shape", [[0], [-2], [3, 0], [-1, -5]])
def test_shapes_with_zero_or_negative_dims_are_rejected(shape: list[int]) -> None:
    with pytest.raises(ValidationError, match="positive or -1"):
        TensorSpec(name="x", datatype="FP32", shape=shape)


def test_tensor_datatype_and_name_are_checked() -> None:
    with pytest.raises(ValidationError, match="datatype"):
        TensorSpec.model_validate({"name": "x", "datatype": "FLOAT32", "shape": [1]})
    with pytest.raises(ValidationError, match="name"):
        TensorSpec(name="", datatype="FP32", shape=[1])


@pytest.mark.parametrize(
    "data",
    [
        _manifest(extra_key=1),
        _manifest(inputs=[{"name": "x", "datatype": "FP32", "shape": [1], "dims": [1]}]),
        _manifest(
            artifacts=[
                {"file": "a", "sha256": SHA, "size": 1, "target": "t", "checksum": "x"},
            ]
        ),
        _manifest(files=[{"file": "a", "sha256": SHA, "size": 1, "target": "t"}]),
    ],
)
def test_unknown_keys_are_rejected(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ModelManifest.model_validate(data)


@pytest.mark.parametrize("file", ["", "a/b", "a\\b", ".hidden", "manifest.json", "..", "/abs"])
def test_stored_file_names_must_be_plain(file: str) -> None:
    with pytest.raises(ValidationError, match="plain file name"):
        StoredFile(file=file, sha256=SHA, size=1)


@pytest.mark.parametrize(
    ("sha256", "size", "field"),
    [
        ("AB" * 32, 1, "sha256"),
        ("ab" * 31, 1, "sha256"),
        ("zz" * 32, 1, "sha256"),
        (SHA, -1, "size"),
    ],
)
def test_stored_file_digest_and_size_are_checked(sha256: str, size: int, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        StoredFile(file="a.bin", sha256=sha256, size=size)
    assert [error["loc"] for error in info.value.errors()] == [(field,)]


@pytest.mark.parametrize(
    "override",
    [
        {"inputs": []},
        {"outputs": []},
        {"version": 0},
        {"max_batch_size": -1},
    ],
)
def test_manifest_requires_a_signature_and_a_positive_version(
    override: dict[str, Any],
) -> None:
    with pytest.raises(ValidationError) as info:
        ModelManifest.model_validate(_manifest(**override))
    # Refused for the field that is wrong, not for another.
    assert [error["loc"] for error in info.value.errors()] == [tuple(override)]


def test_a_manifest_without_artifacts_describes_a_version_served_from_upstream() -> None:
    m = ModelManifest.model_validate(_manifest(artifacts=[]))
    assert m.artifacts == []
    assert m.artifact("onnxruntime") is None


def test_manifest_round_trips_through_json_and_is_frozen() -> None:
    m = ModelManifest.model_validate(
        _manifest(
            files=[{"file": "samples.npz", "sha256": SHA, "size": 3}],
            metadata={"framework": "torch"},
        )
    )
    assert ModelManifest.model_validate_json(m.model_dump_json(indent=2)) == m
    with pytest.raises(ValidationError, match="frozen"):
        m.version = 2


def test_lookups_by_name_and_target() -> None:
    m = ModelManifest.model_validate(
        _manifest(
            artifacts=[
                {"file": "a.onnx", "sha256": SHA, "size": 1, "target": "onnxruntime"},
                {"file": "b.plan", "sha256": SHA, "size": 1, "target": "tensorrt"},
            ]
        )
    )
    assert m.input("x") == TensorSpec(name="x", datatype="FP32", shape=[-1, 3, 224, 224])
    assert m.input("y") is None
    assert m.output("y") is not None
    assert m.output("x") is None
    artifact = m.artifact("tensorrt")
    assert isinstance(artifact, Artifact)
    assert artifact.file == "b.plan"
    assert m.artifact("torch") is None
