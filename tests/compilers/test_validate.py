"""Parity of an artifact against its reference: the numbers, the verdict, the tolerances."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compilers.demo import INPUTS, digits_cnn
from compilers.errors import ParityError
from compilers.export import export_module
from compilers.signature import ModelSignature, random_inputs
from compilers.targets import Runner
from compilers.targets.onnxruntime import OnnxRuntimeTarget
from compilers.validate import (
    TOLERANCES,
    Reference,
    Tolerance,
    check_parity,
    onnx_reference,
    tolerance_for,
    torch_reference,
)

FP32 = TOLERANCES["fp32"]


@pytest.fixture(scope="module")
def cnn_artifact(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[nn.Module, ModelSignature, Path]:
    torch.manual_seed(0)
    module = digits_cnn().eval()
    work = tmp_path_factory.mktemp("cnn")
    signature = export_module(module, INPUTS, work / "model.onnx", output_names=["logits"])
    artifact = OnnxRuntimeTarget().compile(work / "model.onnx", work, signature)
    return module, signature, artifact.path


def test_the_artifact_of_a_real_model_passes_against_torch(
    cnn_artifact: tuple[nn.Module, ModelSignature, Path],
) -> None:
    module, signature, path = cnn_artifact
    samples = random_inputs(signature.inputs, 48)

    parity = check_parity(
        OnnxRuntimeTarget().load(path),
        torch_reference(module, signature),
        samples,
        FP32,
        batch_size=16,
    )

    assert parity.reference == "torch"
    assert parity.samples == 48
    assert 0 <= parity.max_abs_err <= FP32.atol
    assert parity.max_rel_err < 1
    assert parity.top1_agreement == 1.0
    assert (parity.atol, parity.rtol) == (FP32.atol, FP32.rtol)


def test_the_artifact_fails_against_a_module_with_perturbed_weights(
    cnn_artifact: tuple[nn.Module, ModelSignature, Path],
) -> None:
    module, signature, path = cnn_artifact
    perturbed = copy.deepcopy(module)
    last = list(perturbed.modules())[-1]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        last.weight.mul_(1.01)  # logits off by about 1%

    with pytest.raises(ParityError) as failure:
        check_parity(
            OnnxRuntimeTarget().load(path),
            torch_reference(perturbed, signature),
            random_inputs(signature.inputs, 8),
            FP32,
        )

    parity = failure.value.parity
    assert parity is not None
    assert parity.max_abs_err > FP32.atol
    message = str(failure.value)
    assert f"max abs err {parity.max_abs_err:.3g}" in message
    assert f"max rel err {parity.max_rel_err:.3g}" in message
    assert "atol=0.0001" in message
    assert "rtol=0.001" in message


def _constant(name: str, values: dict[str, np.ndarray]) -> Reference:
    def run(inputs: object) -> dict[str, np.ndarray]:
        return values

    return Reference(name=name, run=run)


def _fixed(values: dict[str, np.ndarray]) -> Runner:
    def run(inputs: object) -> dict[str, np.ndarray]:
        n = len(next(iter(inputs.values())))  # type: ignore[attr-defined]
        return {k: v[:n] for k, v in values.items()}

    return run


def test_relative_error_is_against_the_reference_or_atol_whichever_is_larger() -> None:
    expected = np.array([[100.0, 0.0]], np.float32)
    actual = np.array([[100.05, 0.00005]], np.float32)

    parity = check_parity(
        _fixed({"y": actual}), _constant("ref", {"y": expected}), {"x": np.zeros((1, 1))}, FP32
    )

    # 0.05 / 100 and 5e-5 / max(0, atol=1e-4): the larger is 0.5, near zero.
    assert parity.max_rel_err == pytest.approx(0.5, rel=1e-3)
    assert parity.max_abs_err == pytest.approx(0.05, rel=1e-3)
    # Both pass |a-b| <= atol + rtol*|b|: 0.05 <= 1e-4 + 0.1, 5e-5 <= 1e-4.
    assert parity.top1_agreement == 1.0


def test_nan_where_the_reference_is_finite_fails() -> None:
    with pytest.raises(ParityError, match="max abs err inf"):
        check_parity(
            _fixed({"y": np.array([[np.nan, 1.0]])}),
            _constant("ref", {"y": np.array([[0.5, 1.0]])}),
            {"x": np.zeros((1, 1))},
            FP32,
        )


def test_top1_agreement_counts_rows_whose_argmax_differs() -> None:
    expected = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    actual = expected.copy()
    actual[0] = [0.49, 0.51]  # a flip, within a loose tolerance

    parity = check_parity(
        _fixed({"y": actual}),
        _constant("ref", {"y": expected}),
        {"x": np.zeros((4, 1))},
        Tolerance(atol=1.0, rtol=0.0),
    )

    assert parity.top1_agreement == 0.75


def test_the_plain_onnx_reference_runs_the_source_graph(
    cnn_artifact: tuple[nn.Module, ModelSignature, Path],
) -> None:
    _, signature, path = cnn_artifact
    reference = onnx_reference(path.parent / "model.onnx")
    samples = random_inputs(signature.inputs, 4)

    parity = check_parity(OnnxRuntimeTarget().load(path), reference, samples, FP32)

    assert parity.reference == "onnx"
    assert parity.max_abs_err <= FP32.atol


def test_tolerances_are_looser_for_lower_precisions_and_can_be_overridden() -> None:
    assert TOLERANCES["fp16"].atol > TOLERANCES["fp32"].atol
    assert TOLERANCES["fp16"].rtol > TOLERANCES["fp32"].rtol
    assert tolerance_for("fp32", atol=1e-2) == Tolerance(atol=1e-2, rtol=FP32.rtol)
    with pytest.raises(ValueError, match="no default tolerance for precision 'fp8'"):
        tolerance_for("fp8")
