"""The compile target table and the ONNX Runtime target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compilers.errors import BuildError, UnknownTargetError
from compilers.export import export_module
from compilers.signature import ModelSignature
from compilers.targets import COMPILE_TARGETS, get_target
from compilers.targets.onnxruntime import OnnxRuntimeTarget
from model_store.manifest import TensorSpec
from tests.helpers.tiny_models import tiny_mlp

INPUTS = [TensorSpec(name="x", datatype="FP32", shape=[-1, 4])]


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, ModelSignature]:
    path = tmp_path / "model.onnx"
    return path, export_module(tiny_mlp(), INPUTS, path)


def test_an_unknown_target_names_the_known_ones() -> None:
    with pytest.raises(
        UnknownTargetError, match=r"unknown compile target 'tensorrt-x'.*onnxruntime"
    ):
        get_target("tensorrt-x")


def test_a_target_whose_module_cannot_load_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(COMPILE_TARGETS, "missing", "compilers.targets.no_such_module:Target")

    with pytest.raises(UnknownTargetError, match="'missing' cannot be loaded"):
        get_target("missing")


def test_the_table_resolves_onnxruntime() -> None:
    target = get_target("onnxruntime")

    assert isinstance(target, OnnxRuntimeTarget)
    assert target.name == "onnxruntime"


def test_onnxruntime_artifact_is_an_optimised_graph_that_matches_the_source(
    tmp_path: Path, exported: tuple[Path, ModelSignature]
) -> None:
    source, signature = exported
    target = OnnxRuntimeTarget()

    artifact = target.compile(source, tmp_path / "out", signature)

    assert artifact.path == tmp_path / "out" / "model.ort.onnx"
    assert artifact.options == {
        "graph_optimization_level": "ORT_ENABLE_EXTENDED",
        "onnxruntime_version": ort.__version__,
        "providers": ["CPUExecutionProvider"],
    }
    # Extended optimisation fuses nodes (fewer of them, some of an op the source lacks);
    # it adds no NCHWc layout ops, which would tie the artifact to this host's CPU. Which
    # fusions ONNX Runtime makes is its own affair (it is not pinned).
    before = [(n.domain, n.op_type) for n in onnx.load(str(source)).graph.node]
    after = [(n.domain, n.op_type) for n in onnx.load(str(artifact.path)).graph.node]
    assert len(after) < len(before), (before, after)
    assert set(after) - set(before), (before, after)
    assert not [op for op in after if "nchwc" in f"{op[0]}.{op[1]}".lower()], after
    plain = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    for batch in (1, 64):
        x = np.random.default_rng(batch).random((batch, 4), dtype=np.float32)
        (got,) = target.run(artifact.path, {"x": x}).values()
        np.testing.assert_allclose(got, plain.run(None, {"x": x})[0], atol=1e-6, rtol=1e-5)


def test_onnxruntime_target_rejects_unknown_options(
    tmp_path: Path, exported: tuple[Path, ModelSignature]
) -> None:
    source, signature = exported
    with pytest.raises(BuildError, match="unknown onnxruntime target options"):
        OnnxRuntimeTarget().compile(source, tmp_path, signature, {"precision": "fp16"})
    with pytest.raises(BuildError, match="unknown graph_optimization_level 'MAX'"):
        OnnxRuntimeTarget().compile(
            source, tmp_path, signature, {"graph_optimization_level": "MAX"}
        )
