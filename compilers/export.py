"""Export a torch module to ONNX with a dynamic batch axis, or take an ONNX file as it is."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from compilers.errors import ExportError
from compilers.signature import ModelSignature, numpy_dtype, read_onnx_signature
from model_store.importer import import_from_string
from model_store.manifest import TensorSpec

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "export_module", "import_onnx", "load_module"]

#: The opset torch exports to; ONNX Runtime 1.18 and later run it.
DEFAULT_OPSET = 18
#: The oldest opset an export may ask for.
MIN_OPSET = 17

# The batch size of the example inputs that trace the module. Not 1: torch.export
# specialises a dim whose example size is 0 or 1 to that constant.
_EXAMPLE_BATCH = 2


def load_module(spec: str) -> nn.Module:
    """Import ``"package.module:factory"``, call ``factory()``; return the module in eval mode."""
    try:
        factory: Any = import_from_string(spec)
    except ValueError:
        raise ExportError(f"a module spec is 'package.module:factory', got {spec!r}") from None
    except (ImportError, AttributeError) as exc:
        raise ExportError(f"cannot load {spec!r}: {exc}") from exc
    if not callable(factory):
        raise ExportError(f"{spec!r} is not callable")
    try:
        model = factory()
    except Exception as exc:
        raise ExportError(f"{spec}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ExportError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _example_inputs(inputs: Sequence[TensorSpec]) -> tuple[torch.Tensor, ...]:
    tensors = []
    for spec in inputs:
        if not spec.shape or spec.shape[0] != -1:
            raise ExportError(
                f"input {spec.name!r} has shape {spec.shape}: dim 0 must be -1 (the batch axis)"
            )
        if any(d == -1 for d in spec.shape[1:]):
            raise ExportError(
                f"input {spec.name!r} has shape {spec.shape}: only dim 0 may be dynamic"
            )
        if spec.datatype == "BYTES":
            raise ExportError(f"input {spec.name!r} is BYTES, which a torch module cannot take")
        shape = (_EXAMPLE_BATCH, *spec.shape[1:])
        zeros = torch.from_numpy(np.zeros(shape, dtype=numpy_dtype(spec.datatype)))
        tensors.append(torch.rand_like(zeros) if zeros.is_floating_point() else zeros)
    return tuple(tensors)


def _count_outputs(module: nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    with torch.no_grad():
        out = module(*args)
    if isinstance(out, torch.Tensor):
        return 1
    if isinstance(out, list | tuple) and all(isinstance(o, torch.Tensor) for o in out):
        return len(out)
    raise ExportError(
        f"the module returns {type(out).__name__}; export needs a tensor or a tuple of tensors"
    )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # torch's exporter warns about its own internals (pytree deprecations raised
    # from copyreg) and logs one line per torchvision op it skips: noise a user
    # cannot act on. Warnings about the user's module (UserWarning) stay visible.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        registration.setLevel(level)


def export_module(
    module: nn.Module,
    inputs: Sequence[TensorSpec],
    out_path: Path,
    *,
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
) -> ModelSignature:
    """Export ``module`` to ``out_path`` as one ONNX file; return the graph's signature.

    ``inputs`` are the module's positional arguments in order, each with dim 0 = -1:
    dim 0 of every input and output becomes the symbolic axis ``batch``. Outputs are
    named ``output_names``, else ``output`` (one) or ``output_0``, ``output_1``...
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is older than the oldest supported, {MIN_OPSET}")
    if not inputs:
        raise ExportError("a module export needs at least one input spec")
    module = module.eval()
    args = _example_inputs(inputs)
    n_outputs = _count_outputs(module, args)
    if output_names is None:
        output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    elif len(output_names) != n_outputs:
        raise ExportError(
            f"the module returns {n_outputs} outputs, {len(output_names)} names given"
        )
    batch = torch.export.Dim("batch")
    try:
        with _quiet_exporter():
            # The dynamo exporter (torch.export + onnxscript) is torch's supported
            # path; it runs offline and takes dynamic_shapes, one dict per argument.
            torch.onnx.export(
                module,
                args,
                str(out_path),
                dynamo=True,
                verbose=False,
                external_data=False,
                opset_version=opset,
                input_names=[s.name for s in inputs],
                output_names=list(output_names),
                dynamic_shapes=tuple({0: batch} for _ in inputs),
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {exc}") from exc
    signature = read_onnx_signature(out_path)
    _check_exported(signature, inputs, output_names)
    return signature


def _check_exported(
    signature: ModelSignature, inputs: Sequence[TensorSpec], output_names: Sequence[str]
) -> None:
    if signature.input_names != [s.name for s in inputs]:
        raise ExportError(
            f"the exported graph's inputs are {signature.input_names}, "
            f"expected {[s.name for s in inputs]}"
        )
    if signature.output_names != list(output_names):
        raise ExportError(
            f"the exported graph's outputs are {signature.output_names}, "
            f"expected {list(output_names)}"
        )
    if not signature.batchable():
        fixed = [t.name for t in (*signature.inputs, *signature.outputs) if t.shape[:1] != [-1]]
        raise ExportError(f"dim 0 is not dynamic in the exported graph for {fixed}")


def import_onnx(src: Path, out_path: Path) -> ModelSignature:
    """Check the ONNX file ``src``, write it to ``out_path`` as one file; return its signature.

    External weights are folded into the copy, so the result stands alone (models
    over 2 GB, which protobuf cannot hold in one file, are not supported).
    """
    try:
        model = onnx.load(str(src))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ExportError(f"{src} is not a valid ONNX model: {exc}") from exc
    try:
        signature = read_onnx_signature(model)
    except ValueError as exc:
        raise ExportError(f"{src}: {exc}") from exc
    onnx.save(model, str(out_path))
    return signature
