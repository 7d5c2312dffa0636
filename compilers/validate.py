"""Numerical parity of a compiled artifact against a reference, on sample inputs.

For each output, with ``a`` the artifact's values and ``b`` the reference's:

- abs error ``|a - b|``;
- rel error ``|a - b| / max(|b|, eps)``, where ``eps`` is the tolerance's ``atol``:
  values smaller than ``atol`` are judged by the absolute bound anyway, and a
  smaller ``eps`` would turn noise around zero into huge relative errors;
- a value passes when ``|a - b| <= atol + rtol * |b|`` (numpy's ``allclose``), and
  the artifact passes when every value of every output does (NaN only where the
  reference has NaN).

Top-1 agreement is reported for classifier-like outputs (2-D floats, more than one
column): the share of rows whose argmax agrees, the worst over such outputs. It is
recorded, not judged: near-ties may flip within tolerance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from compilers.errors import ParityError
from compilers.signature import ModelSignature
from compilers.targets import Runner
from model_store.manifest import Parity

__all__ = [
    "TOLERANCES",
    "ParityError",
    "Reference",
    "Tolerance",
    "check_parity",
    "onnx_reference",
    "tolerance_for",
    "torch_reference",
]


@dataclass(frozen=True)
class Tolerance:
    """How far an artifact's values may be from the reference's: ``atol + rtol * |ref|``."""

    atol: float
    rtol: float


#: Default tolerance per artifact precision (``options["precision"]``, fp32 if absent).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3),
    "tf32": Tolerance(atol=1e-3, rtol=1e-2),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2),
    "bf16": Tolerance(atol=5e-2, rtol=5e-2),
    "int8": Tolerance(atol=1e-1, rtol=1e-1),
}


def tolerance_for(
    precision: str, *, atol: float | None = None, rtol: float | None = None
) -> Tolerance:
    """The default tolerance for ``precision``, with ``atol``/``rtol`` overriding it."""
    try:
        default = TOLERANCES[precision]
    except KeyError:
        raise ValueError(
            f"no default tolerance for precision {precision!r}; known: {', '.join(TOLERANCES)}"
        ) from None
    return Tolerance(
        atol=default.atol if atol is None else atol, rtol=default.rtol if rtol is None else rtol
    )


@dataclass(frozen=True)
class Reference:
    """The outputs an artifact must reproduce: a name for the record and a runner."""

    name: str
    run: Runner


def torch_reference(module: nn.Module, signature: ModelSignature) -> Reference:
    """The torch module itself, in eval mode without autograd, as the reference."""
    module = module.eval()

    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in signature.input_names]
        with torch.no_grad():
            out = module(*args)
        tensors = [out] if isinstance(out, torch.Tensor) else list(out)
        return {
            name: t.detach().cpu().numpy()
            for name, t in zip(signature.output_names, tensors, strict=True)
        }

    return Reference(name="torch", run=run)


def onnx_reference(onnx_path: Path) -> Reference:
    """The plain ONNX model run by ONNX Runtime with no graph optimisation, as the reference."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, dict(inputs)), strict=True))

    return Reference(name="onnx", run=run)


def _run_batched(
    runner: Runner, samples: Mapping[str, np.ndarray], batch_size: int
) -> dict[str, np.ndarray]:
    n = next(iter(samples.values())).shape[0]
    chunks = [
        runner({k: v[start : start + batch_size] for k, v in samples.items()})
        for start in range(0, n, batch_size)
    ]
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


@dataclass
class _Errors:
    max_abs: float = 0.0
    max_rel: float = 0.0
    failing: int = 0
    worst_output: str = ""


def _compare(
    name: str, actual: np.ndarray, expected: np.ndarray, tolerance: Tolerance, errors: _Errors
) -> None:
    if actual.shape != expected.shape:
        raise ParityError(
            f"output {name!r} has shape {list(actual.shape)}, "
            f"the reference's has {list(expected.shape)}"
        )
    a = actual.astype(np.float64)
    b = expected.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    with np.errstate(invalid="ignore"):
        abs_err = np.where(both_nan, 0.0, np.abs(a - b))
    abs_err = np.where(np.isnan(abs_err), np.inf, abs_err)
    rel_err = abs_err / np.maximum(np.abs(np.nan_to_num(b)), max(tolerance.atol, 1e-30))
    failing = int(np.count_nonzero(abs_err > tolerance.atol + tolerance.rtol * np.abs(b)))
    if abs_err.size and float(abs_err.max()) >= errors.max_abs:
        errors.worst_output = name
    errors.max_abs = max(errors.max_abs, float(abs_err.max(initial=0.0)))
    errors.max_rel = max(errors.max_rel, float(rel_err.max(initial=0.0)))
    errors.failing += failing


def _top1_agreement(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]
) -> float | None:
    agreements = [
        float(np.mean(np.argmax(actual[n], axis=1) == np.argmax(b, axis=1)))
        for n, b in expected.items()
        if b.ndim == 2 and b.shape[1] > 1 and np.issubdtype(b.dtype, np.floating) and len(b)
    ]
    return min(agreements) if agreements else None


def check_parity(
    runner: Runner,
    reference: Reference,
    samples: Mapping[str, np.ndarray],
    tolerance: Tolerance,
    *,
    batch_size: int = 64,
    check_batch_one: bool = True,
    label: str = "artifact",
) -> Parity:
    """Compare ``runner`` with ``reference`` on ``samples``; raise ``ParityError`` above tolerance.

    The artifact runs the samples in batches of ``batch_size`` and, with
    ``check_batch_one``, the first sample alone too, so that a model that only
    works at one batch size fails here rather than in serving.
    """
    if not samples:
        raise ValueError("parity needs at least one sample input")
    n = next(iter(samples.values())).shape[0]
    if n == 0:
        raise ValueError("parity needs at least one sample")
    expected = reference.run(samples)
    actual = _run_batched(runner, samples, max(batch_size, 1))
    single = runner({k: v[:1] for k, v in samples.items()}) if check_batch_one else None
    if set(actual) != set(expected):
        raise ParityError(
            f"{label} returns outputs {sorted(actual)}, the reference {sorted(expected)}"
        )
    errors = _Errors()
    for name, b in expected.items():
        _compare(name, actual[name], b, tolerance, errors)
        if single is not None:
            _compare(name, single[name], b[:1], tolerance, errors)
    parity = Parity(
        reference=reference.name,
        samples=n,
        max_abs_err=errors.max_abs,
        max_rel_err=errors.max_rel,
        atol=tolerance.atol,
        rtol=tolerance.rtol,
        top1_agreement=_top1_agreement(actual, expected),
    )
    if errors.failing:
        raise ParityError(
            f"{label} differs from the {reference.name} reference beyond tolerance in "
            f"{errors.failing} compared values (worst in output {errors.worst_output!r}, "
            f"{n} samples): "
            f"max abs err {errors.max_abs:.3g}, max rel err {errors.max_rel:.3g}, "
            f"top-1 agreement {parity.top1_agreement}; tolerance atol={tolerance.atol:g}, "
            f"rtol={tolerance.rtol:g} (|a-b| <= atol + rtol*|ref|)",
            parity,
        )
    return parity
