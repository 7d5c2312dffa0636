"""Artifact selection for a host, in the documented order of preference."""

from __future__ import annotations

import pytest

from model_store.manifest import Artifact, ModelManifest, TensorSpec
from serving.inference.executors import HostInfo
from serving.inference.replica import (
    NoFittingArtifact,
    needs_gpu,
    preference_order,
    select_artifact,
)


def _manifest(*artifacts: Artifact) -> ModelManifest:
    return ModelManifest(
        name="m",
        version=1,
        platform="onnxruntime_onnx",
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 2])],
        max_batch_size=8,
        artifacts=list(artifacts),
    )


def _artifact(target: str, file: str, **options: object) -> Artifact:
    return Artifact(target=target, file=file, sha256="a" * 64, size=1, options=dict(options))


def test_first_fitting_target_in_preference_order_wins() -> None:
    m = _manifest(
        _artifact("onnxruntime", "model.onnx"),
        _artifact("tensorrt", "model.plan", compute_capability="9.0"),
    )
    choice = select_artifact(m, ["tensorrt", "onnxruntime"], HostInfo())
    assert choice.artifact.target == "onnxruntime"
    assert "tensorrt:model.plan" in choice.skipped


def test_unfit_provider_is_skipped_with_its_reason() -> None:
    m = _manifest(
        _artifact("onnxruntime", "gpu.onnx", providers=["CUDAExecutionProvider"]),
        _artifact("onnxruntime", "cpu.onnx"),
    )
    choice = select_artifact(m, ["onnxruntime"], HostInfo())
    assert choice.artifact.file == "cpu.onnx"
    assert "CUDAExecutionProvider" in choice.skipped["onnxruntime:gpu.onnx"]


def test_no_fitting_artifact_says_why() -> None:
    m = _manifest(_artifact("tensorrt", "model.plan"))
    with pytest.raises(NoFittingArtifact, match=r"tensorrt:model\.plan"):
        select_artifact(m, ["tensorrt", "onnxruntime"], HostInfo())


def test_gpu_need_follows_the_preferred_artifact() -> None:
    m = _manifest(
        _artifact("onnxruntime", "m.onnx"),
        _artifact("torch", "cpu.pt2", device="cpu"),
        _artifact("torch", "cuda.pt2", device="cuda"),
    )
    ordered = preference_order(m, ["tensorrt", "torch:cuda", "onnxruntime", "torch"])
    assert [a.file for a in ordered] == ["cuda.pt2", "m.onnx", "cpu.pt2"]
    assert needs_gpu(ordered[0])
    assert not needs_gpu(preference_order(m, ["onnxruntime"])[0])
