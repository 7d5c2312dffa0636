"""build_model: export, compile, check parity, publish; nothing published on failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from compilers.errors import BuildError, ParityError, UnknownTargetError
from compilers.pipeline import PLATFORM, SOURCE_FILE, build_model
from compilers.targets import COMPILE_TARGETS
from model_store.manifest import TensorSpec
from model_store.store import ModelStore
from tests.helpers.tiny_models import tiny_mlp, write_matmul_onnx

INPUTS = [TensorSpec(name="x", datatype="FP32", shape=[-1, 4])]


@pytest.fixture
def faulty_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """Add a target that scales every weight by 1.05: a miscompile, computed for real."""
    monkeypatch.setitem(
        COMPILE_TARGETS, "faulty", "tests.compilers.faulty_target:ScaledWeightsTarget"
    )


def test_a_module_is_published_with_its_artifact_parity_and_source(
    store: ModelStore, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")

    manifest = build_model(
        store,
        "mlp",
        module=tiny_mlp(),
        inputs=INPUTS,
        output_names=["scores"],
        max_batch_size=16,
        extra_files={"notes.txt": notes},
        metadata={"owner": "tests"},
    )

    assert (manifest.name, manifest.version, manifest.platform) == ("mlp", 1, PLATFORM)
    assert manifest.inputs == INPUTS
    assert [(o.name, o.shape) for o in manifest.outputs] == [("scores", [-1, 3])]
    assert manifest.max_batch_size == 16
    assert manifest.metadata["owner"] == "tests"
    assert manifest.metadata["build"]["source"] == "torch"
    assert sorted(f.file for f in manifest.files) == ["model.onnx", "notes.txt"]
    artifact = manifest.artifact("onnxruntime")
    assert artifact is not None
    assert artifact.file == "model.ort.onnx"
    assert artifact.options["providers"] == ["CPUExecutionProvider"]
    assert artifact.parity is not None
    assert artifact.parity.reference == "torch"
    assert artifact.parity.samples == 16
    assert artifact.parity.max_abs_err <= artifact.parity.atol
    assert store.manifest("mlp") == manifest
    session = ort.InferenceSession(
        str(store.artifact_path(manifest, artifact)), providers=["CPUExecutionProvider"]
    )
    for batch in (1, 16):
        (scores,) = session.run(None, {"x": np.ones((batch, 4), np.float32)})
        assert scores.shape == (batch, 3)


def test_an_onnx_file_is_checked_against_plain_onnx_runtime(
    store: ModelStore, tmp_path: Path
) -> None:
    source = tmp_path / "given.onnx"
    write_matmul_onnx(source)
    samples = np.random.default_rng(0).random((10, 3), dtype=np.float32)

    manifest = build_model(store, "matmul", onnx_path=source, samples=samples)

    assert [(t.name, t.shape) for t in manifest.inputs] == [("x", [-1, 3])]
    assert [(t.name, t.shape) for t in manifest.outputs] == [("y", [-1, 2])]
    assert manifest.metadata["build"]["source"] == "onnx"
    parity = manifest.artifacts[0].parity
    assert parity is not None
    assert (parity.reference, parity.samples) == ("onnx", 10)


def test_a_miscompiled_artifact_fails_parity_and_nothing_is_published(
    store: ModelStore, faulty_target: None
) -> None:
    with pytest.raises(ParityError, match="faulty artifact differs from the torch reference"):
        build_model(
            store, "mlp", module=tiny_mlp(), inputs=INPUTS, targets=["onnxruntime", "faulty"]
        )

    assert store.versions("mlp") == []
    assert store.models() == []


def test_a_looser_tolerance_override_lets_the_same_artifact_through(
    store: ModelStore, faulty_target: None
) -> None:
    manifest = build_model(
        store, "mlp", module=tiny_mlp(), inputs=INPUTS, targets=["faulty"], atol=1.0, rtol=1.0
    )

    artifact = manifest.artifact("faulty")
    assert artifact is not None and artifact.parity is not None
    assert artifact.parity.atol == 1.0
    assert artifact.parity.max_abs_err > 1e-3


def test_an_unknown_target_fails_before_anything_is_built(store: ModelStore) -> None:
    with pytest.raises(UnknownTargetError, match="unknown compile target 'tensorrt-sm99'"):
        build_model(store, "mlp", module=tiny_mlp(), inputs=INPUTS, targets=["tensorrt-sm99"])

    assert store.models() == []


def test_a_fixed_batch_graph_cannot_be_published_with_batching(
    store: ModelStore, tmp_path: Path
) -> None:
    source = tmp_path / "fixed.onnx"
    write_matmul_onnx(source, batch=4)

    with pytest.raises(BuildError, match="needs dim 0 dynamic"):
        build_model(store, "fixed", onnx_path=source)
    manifest = build_model(store, "fixed", onnx_path=source, max_batch_size=0)
    assert manifest.max_batch_size == 0
    assert manifest.inputs[0].shape == [4, 3]


def test_samples_of_the_wrong_dtype_are_refused_clearly(store: ModelStore) -> None:
    with pytest.raises(BuildError, match="sample input 'x' is float64, the model wants FP32"):
        build_model(store, "mlp", module=tiny_mlp(), inputs=INPUTS, samples=np.zeros((3, 4)))


def test_the_source_graph_name_is_reserved(store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=SOURCE_FILE):
        build_model(
            store, "mlp", module=tiny_mlp(), inputs=INPUTS, extra_files={SOURCE_FILE: tmp_path}
        )
