"""Export to ONNX with a dynamic batch axis, ONNX files as sources, module specs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compilers.demo import INPUTS, digits_cnn
from compilers.errors import ExportError
from compilers.export import MIN_OPSET, export_module, import_onnx, load_module
from compilers.signature import read_onnx_signature
from model_store.manifest import TensorSpec
from tests.helpers.tiny_models import tiny_mlp, two_headed, write_matmul_onnx

TWO_HEADED_INPUTS = [
    TensorSpec(name="features", datatype="FP32", shape=[-1, 4]),
    TensorSpec(name="ids", datatype="INT64", shape=[-1, 2]),
]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 64])
def test_exported_cnn_runs_at_batch_1_and_64_like_torch(tmp_path: Path, batch: int) -> None:
    module = digits_cnn().eval()
    path = tmp_path / "model.onnx"
    signature = export_module(module, INPUTS, path, output_names=["logits"])

    assert signature.inputs == INPUTS
    assert [(o.name, o.datatype, o.shape) for o in signature.outputs] == [
        ("logits", "FP32", [-1, 10])
    ]
    x = np.random.default_rng(batch).random((batch, 1, 28, 28), dtype=np.float32)
    (logits,) = _session(path).run(None, {"input": x})
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    assert logits.shape == (batch, 10)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-4)


def test_export_opset_is_at_least_17(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    export_module(tiny_mlp(), [TensorSpec(name="x", datatype="FP32", shape=[-1, 4])], path)

    opsets = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
    assert opsets[""] >= MIN_OPSET


def test_export_of_two_inputs_and_two_outputs_names_them_in_order(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    signature = export_module(two_headed(), TWO_HEADED_INPUTS, path)

    assert signature.input_names == ["features", "ids"]
    assert signature.output_names == ["output_0", "output_1"]
    assert [o.shape for o in signature.outputs] == [[-1, 3], [-1, 1]]
    for batch in (1, 64):
        scores, total = _session(path).run(
            None,
            {
                "features": np.ones((batch, 4), np.float32),
                "ids": np.zeros((batch, 2), np.int64),
            },
        )
        assert scores.shape == (batch, 3)
        assert total.shape == (batch, 1)


def test_export_rejects_a_fixed_batch_dim(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="dim 0 must be -1"):
        export_module(
            tiny_mlp(), [TensorSpec(name="x", datatype="FP32", shape=[8, 4])], tmp_path / "m.onnx"
        )


def test_export_rejects_the_wrong_number_of_output_names(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="returns 2 outputs"):
        export_module(two_headed(), TWO_HEADED_INPUTS, tmp_path / "m.onnx", output_names=["a"])


def test_onnx_file_source_reads_its_signature_from_the_graph(tmp_path: Path) -> None:
    src = tmp_path / "given.onnx"
    write_matmul_onnx(src)

    signature = import_onnx(src, tmp_path / "model.onnx")

    assert [(t.name, t.datatype, t.shape) for t in signature.inputs] == [("x", "FP32", [-1, 3])]
    assert [(t.name, t.datatype, t.shape) for t in signature.outputs] == [("y", "FP32", [-1, 2])]
    assert read_onnx_signature(tmp_path / "model.onnx") == signature


def test_an_invalid_onnx_file_is_rejected_with_its_path(tmp_path: Path) -> None:
    src = tmp_path / "broken.onnx"
    src.write_bytes(b"not a protobuf")

    with pytest.raises(ExportError, match=r"broken\.onnx is not a valid ONNX model"):
        import_onnx(src, tmp_path / "model.onnx")


def test_load_module_calls_the_factory_and_sets_eval_mode() -> None:
    module = load_module("tests.helpers.tiny_models:tiny_mlp")

    assert isinstance(module, torch.nn.Sequential)
    assert not module.training


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.helpers.tiny_models", "package.module:factory"),
        ("tests.compilers.no_such_module:f", "cannot load"),
        ("tests.helpers.tiny_models:no_such_factory", "cannot load"),
        ("tests.helpers.tiny_models:__all__", "not callable"),
        ("builtins:dict", "returned dict, not a torch.nn.Module"),
        ("numpy:zeros_like", r"numpy:zeros_like\(\) raised TypeError"),
    ],
)
def test_load_module_explains_a_bad_spec(spec: str, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        load_module(spec)
