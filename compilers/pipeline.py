"""Build a model: export, compile for each target, check parity, publish a version."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from compilers.errors import BuildError
from compilers.export import DEFAULT_OPSET, export_module, import_onnx
from compilers.progress import Progress, timed
from compilers.signature import ModelSignature, check_inputs, random_inputs
from compilers.targets import BuildSource, CompileTarget, get_target
from compilers.validate import (
    Reference,
    check_parity,
    onnx_reference,
    tolerance_for,
    torch_reference,
)
from model_store.manifest import ModelManifest, TensorSpec, validate_model_name
from model_store.store import ArtifactSource, ModelStore

__all__ = ["PLATFORM", "SOURCE_FILE", "build_model"]

#: The platform of every version the pipeline publishes (Triton's name for it).
PLATFORM = "onnxruntime_onnx"
#: The exported (or given) ONNX graph, published with each version for later compiles.
SOURCE_FILE = "model.onnx"

# How many random samples parity uses when none are given (capped by the max batch).
_RANDOM_SAMPLES = 32


def build_model(
    store: ModelStore,
    name: str,
    *,
    module: nn.Module | None = None,
    onnx_path: Path | None = None,
    inputs: Sequence[TensorSpec] | None = None,
    output_names: Sequence[str] | None = None,
    targets: Sequence[str] = ("onnxruntime",),
    target_options: Mapping[str, Mapping[str, Any]] | None = None,
    max_batch_size: int = 64,
    samples: np.ndarray | Mapping[str, np.ndarray] | None = None,
    extra_files: Mapping[str, Path] | None = None,
    metadata: Mapping[str, Any] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    progress: Progress | None = None,
) -> ModelManifest:
    """Build ``name`` from a torch ``module`` or an ``onnx_path`` and publish a new version.

    A module needs ``inputs`` (its arguments in order, dim 0 = -1) and may name its
    outputs. Every target compiles the ONNX graph and must match the reference (the
    module, or the ONNX graph run by plain ONNX Runtime) on ``samples`` (random
    inputs when None) within the precision's tolerance, ``atol``/``rtol`` overriding
    it; otherwise ``ParityError`` is raised and nothing is published. ``progress``
    receives a line per phase (export, compile and parity per target, publish).
    """
    validate_model_name(name)
    if (module is None) == (onnx_path is None):
        raise BuildError("build from exactly one source: a torch module or an ONNX file")
    if module is not None and not inputs:
        raise BuildError("a torch module needs its input specs (name, datatype, shape)")
    if max_batch_size < 0:
        raise BuildError(f"max_batch_size must be 0 (no batching) or more, got {max_batch_size}")
    if len(set(targets)) != len(targets) or not targets:
        raise BuildError(f"give each target once, at least one: {list(targets)}")
    compile_targets = [get_target(t) for t in targets]
    files = dict(extra_files or {})
    if SOURCE_FILE in files:
        raise BuildError(f"{SOURCE_FILE!r} is the exported graph; name the extra file otherwise")

    with tempfile.TemporaryDirectory(prefix="fermion-build-") as tmp:
        work = Path(tmp)
        source = work / SOURCE_FILE
        reference: Reference
        if module is not None:
            assert inputs is not None
            with timed(progress, f"{name}: export to ONNX (opset {DEFAULT_OPSET})"):
                signature = export_module(module, inputs, source, output_names=output_names)
            reference = torch_reference(module, signature)
            build: dict[str, Any] = {"source": "torch", "opset": DEFAULT_OPSET}
        else:
            assert onnx_path is not None
            with timed(progress, f"{name}: import {Path(onnx_path).name}"):
                signature = import_onnx(onnx_path, source)
            reference = onnx_reference(source)
            build = {"source": "onnx", "file": Path(onnx_path).name}
        if max_batch_size > 0 and not signature.batchable():
            raise BuildError(
                f"max_batch_size {max_batch_size} needs dim 0 dynamic in every input and "
                f"output; the graph has inputs {list(signature.inputs)} "
                f"and outputs {list(signature.outputs)}"
            )
        sample_inputs = _sample_inputs(signature, samples, max_batch_size)
        build_source = BuildSource(
            onnx_path=source,
            signature=signature,
            max_batch_size=max_batch_size,
            module=module,
            files=files,
        )
        artifacts = [
            _compile_and_check(
                target,
                build_source,
                work / target.name,
                signature,
                reference,
                sample_inputs,
                dict((target_options or {}).get(target.name, {})),
                max_batch_size=max_batch_size,
                atol=atol,
                rtol=rtol,
                progress=progress,
                label=name,
            )
            for target in compile_targets
        ]
        build["targets"] = list(targets)
        with timed(progress, f"{name}: publish") as note:
            manifest = store.publish(
                name,
                platform=PLATFORM,
                inputs=signature.inputs,
                outputs=signature.outputs,
                max_batch_size=max_batch_size,
                artifacts=artifacts,
                files={SOURCE_FILE: source, **files},
                metadata={"build": build, **(metadata or {})},
            )
            note["detail"] = f"version {manifest.version} in {store.root}"
        return manifest


def _sample_inputs(
    signature: ModelSignature,
    samples: np.ndarray | Mapping[str, np.ndarray] | None,
    max_batch_size: int,
) -> dict[str, np.ndarray]:
    if samples is None:
        n = min(max_batch_size, _RANDOM_SAMPLES) if max_batch_size > 0 else 1
        return random_inputs(signature.inputs, n)
    if isinstance(samples, np.ndarray):
        if len(signature.inputs) != 1:
            raise BuildError(
                f"the model has inputs {signature.input_names}: give samples as a dict by name"
            )
        samples = {signature.inputs[0].name: samples}
    try:
        check_inputs(signature.inputs, samples)
    except ValueError as exc:
        raise BuildError(f"bad parity samples: {exc}") from exc
    return dict(samples)


def _compile_and_check(
    target: CompileTarget,
    source: BuildSource,
    out_dir: Path,
    signature: ModelSignature,
    reference: Reference,
    samples: Mapping[str, np.ndarray],
    options: Mapping[str, Any],
    *,
    max_batch_size: int,
    atol: float | None,
    rtol: float | None,
    progress: Progress | None,
    label: str,
) -> ArtifactSource:
    with timed(progress, f"{label}: compile {target.name}"):
        compiled = target.build(source, out_dir, options)
    tolerance = tolerance_for(str(compiled.options.get("precision", "fp32")), atol=atol, rtol=rtol)
    n = next(iter(samples.values())).shape[0]
    with timed(progress, f"{label}: parity of {target.name} on {n} samples") as note:
        parity = check_parity(
            target.load(compiled.path),
            reference,
            samples,
            tolerance,
            batch_size=max_batch_size if max_batch_size > 0 else n,
            check_batch_one=max_batch_size > 0,
            label=f"the {target.name} artifact",
        )
        note["detail"] = f"max abs err {parity.max_abs_err:.3g}"
    return ArtifactSource(
        target=target.name,
        path=compiled.path,
        parity=parity,
        options=compiled.options,
        file=compiled.path.name,
    )
