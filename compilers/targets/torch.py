"""The torch target: torch.export, then an AOTInductor package (``.pt2``) for CPU or CUDA.

The package holds the model compiled ahead of time to a shared library (C++ kernels
on the CPU, Triton kernels on CUDA) plus its weights; serving loads it with
``torch._inductor.aoti_load_package`` and runs it without Python model code.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from compilers.errors import BuildError
from compilers.signature import ModelSignature, numpy_dtype
from compilers.targets import BuildSource, CompiledArtifact, CompileTarget, Runner

__all__ = ["DEVICES", "PRECISIONS", "TorchTarget", "artifact_file", "required_cpu_flags"]

#: Devices a package can be built for.
DEVICES = ("cpu", "cuda")
#: Precision -> the dtype the model computes in (inputs and outputs keep the signature's).
PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
# The example batch that traces the module: not 1, which torch.export would specialise.
_EXAMPLE_BATCH = 2
_OPTIONS = frozenset({"device", "precision", "precompile_headers", "max_autotune"})
_INPUTS_KEY = "fermion_inputs"
_OUTPUTS_KEY = "fermion_outputs"


#: Compiler option names whose /proc/cpuinfo flag is spelt differently.
_CPUINFO_NAMES = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16"}


def required_cpu_flags(isa: str, arch_flags: str) -> list[str]:
    """The CPU flags (as /proc/cpuinfo names them) that a package's kernels need.

    ``isa`` is Inductor's name for the vector instruction set it chose (``avx2``,
    ``avx512 avx512_vnni``, ``asimd``, ...) and ``arch_flags`` the compiler options it
    built the kernels with (``-mavx2 -mfma -mf16c``, ``-march=armv8-a+sve``, ...).
    """
    flags: set[str] = set()
    if "asimd" in isa.split():
        flags.add("asimd")
    for option in arch_flags.split():
        if option.startswith("-march="):
            flags.update(ext for ext in option.removeprefix("-march=").split("+")[1:] if ext)
        elif option.startswith("-m") and "=" not in option:
            name = option.removeprefix("-m").replace("-", "_")
            flags.add(_CPUINFO_NAMES.get(name, name))
    return sorted(flags)


def artifact_file(device: str, precision: str) -> str:
    """The stored file name of a package, e.g. ``model.torch-cuda-fp16.pt2``."""
    return f"model.torch-{device}-{precision}.pt2"


class _CastingModule(nn.Module):
    """Runs ``inner`` in ``dtype``: float inputs cast in, outputs cast back to the signature's."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, out_dtypes: Sequence[torch.dtype]):
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.out_dtypes = tuple(out_dtypes)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cast = [a.to(self.dtype) if a.is_floating_point() else a for a in args]
        out = self.inner(*cast)
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        return tuple(o.to(d) for o, d in zip(outs, self.out_dtypes, strict=True))


def _torch_dtype(datatype: str) -> torch.dtype:
    dtype: torch.dtype = torch.from_numpy(np.zeros(0, dtype=numpy_dtype(datatype))).dtype
    return dtype


def _examples(
    signature: ModelSignature, batch: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    tensors = []
    for spec in signature.inputs:
        shape = [batch if i == 0 and d == -1 else d for i, d in enumerate(spec.shape)]
        if any(d < 1 for d in shape):
            raise BuildError(
                f"input {spec.name!r} has shape {spec.shape}: the torch target takes a dynamic "
                "dim 0 only"
            )
        dtype = _torch_dtype(spec.datatype)
        if dtype.is_floating_point:
            tensors.append(torch.rand(shape, dtype=dtype, device=device))
        else:
            tensors.append(torch.zeros(shape, dtype=dtype, device=device))
    return tuple(tensors)


def _checked_options(
    options: Mapping[str, Any] | None, signature: ModelSignature
) -> tuple[str, str, dict[str, Any]]:
    opts = dict(options or {})
    unknown = sorted(set(opts) - _OPTIONS)
    if unknown:
        raise BuildError(f"unknown torch target options: {unknown}; known: {sorted(_OPTIONS)}")
    device = str(opts.get("device", "cpu"))
    precision = str(opts.get("precision", "fp32"))
    if device not in DEVICES:
        raise BuildError(f"torch target device {device!r}: use one of {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise BuildError(
            f"torch target precision {precision!r}: use one of {', '.join(PRECISIONS)}"
        )
    if device == "cpu" and precision != "fp32":
        raise BuildError(f"precision {precision} needs device cuda; the CPU package is fp32")
    if device == "cuda" and not torch.cuda.is_available():
        raise BuildError("torch target device cuda: this build host has no CUDA GPU torch can use")
    configs = {
        # Precompiled headers pay off only over many builds; the first costs ~3x more.
        "aot_inductor.precompile_headers": bool(opts.get("precompile_headers", False)),
        "max_autotune": bool(opts.get("max_autotune", False)),
        # The tensor names travel in the package, so that a loader can name its tensors.
        "aot_inductor.metadata": {
            _INPUTS_KEY: json.dumps(signature.input_names),
            _OUTPUTS_KEY: json.dumps(signature.output_names),
        },
    }
    return device, precision, configs


class TorchTarget(CompileTarget):
    """Compile the torch module with torch.export and AOTInductor into a ``.pt2`` package.

    Options: ``device`` (``cpu`` or ``cuda``; default ``cpu``), ``precision``
    (``fp32``; ``fp16`` or ``bf16`` on CUDA), ``precompile_headers`` and
    ``max_autotune`` (Inductor settings; default off). The package takes and returns
    the signature's dtypes whatever the precision. It needs the module: a build from
    an ONNX file has none.
    """

    name: ClassVar[str] = "torch"

    def compile(
        self,
        onnx_path: Path,
        out_dir: Path,
        signature: ModelSignature,
        options: Mapping[str, Any] | None = None,
    ) -> CompiledArtifact:
        """Refuse: an ONNX graph alone cannot be compiled by torch.export."""
        raise BuildError(
            "the torch target compiles the torch module itself: build from a module "
            "(--module), not from an ONNX file"
        )

    def build(
        self, source: BuildSource, out_dir: Path, options: Mapping[str, Any] | None = None
    ) -> CompiledArtifact:
        """Export ``source.module`` with a dynamic batch and package it for the device."""
        if source.module is None:
            return self.compile(source.onnx_path, out_dir, source.signature, options)
        device, precision, configs = _checked_options(options, source.signature)
        signature = source.signature
        out_dtypes = [_torch_dtype(o.datatype) for o in signature.outputs]
        inner = copy.deepcopy(source.module).eval().to(device=device, dtype=PRECISIONS[precision])
        module = _CastingModule(inner, PRECISIONS[precision], out_dtypes).eval()
        dynamic = source.max_batch_size > 1
        batch = _EXAMPLE_BATCH if dynamic else 1
        examples = _examples(signature, batch, torch.device(device))
        dynamic_shapes: tuple[tuple[dict[int, Any], ...]] | None = None
        if dynamic:
            dim = torch.export.Dim("batch", min=1, max=source.max_batch_size)
            # One entry, for ``*args``: a spec per positional input.
            dynamic_shapes = (tuple({0: dim} for _ in examples),)
        try:
            with torch.no_grad():
                exported = torch.export.export(module, examples, dynamic_shapes=dynamic_shapes)
        except Exception as exc:
            raise BuildError(f"torch.export failed: {type(exc).__name__}: {exc}") from exc
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / artifact_file(device, precision)
        try:
            with warnings.catch_warnings():
                # torch's own pytree deprecation, raised from its pickling of specs.
                warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)
                torch._inductor.aoti_compile_and_package(
                    exported, package_path=str(path), inductor_configs=configs
                )
        except Exception as exc:
            raise BuildError(f"AOTInductor failed: {type(exc).__name__}: {exc}") from exc
        meta = torch._inductor.aoti_load_package(str(path)).get_metadata()
        built: dict[str, Any] = {
            "device": device,
            "precision": precision,
            "torch_version": torch.__version__,
            "max_batch_size": source.max_batch_size,
        }
        if device == "cuda":
            built["compute_capability"] = _compute_capability(meta)
        else:
            from torch._inductor.cpu_vec_isa import pick_vec_isa

            # The instruction set Inductor compiled this package's kernels for.
            isa = pick_vec_isa()
            built["cpu_isa"] = meta.get("AOTI_CPU_ISA", str(isa)).lower()
            built["cpu_flags"] = required_cpu_flags(str(isa), isa.build_arch_flags() if isa else "")
        return CompiledArtifact(path=path, options=built)

    def load(self, artifact_path: Path) -> Runner:
        """The package loaded with AOTInductor, as a runner on numpy arrays."""
        package = torch._inductor.aoti_load_package(str(artifact_path))
        meta = package.get_metadata()
        device = torch.device(meta.get("AOTI_DEVICE_KEY", "cpu"))
        input_names: list[str] = json.loads(meta[_INPUTS_KEY])
        output_names: list[str] = json.loads(meta[_OUTPUTS_KEY])

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            args = [
                torch.from_numpy(np.ascontiguousarray(inputs[n])).to(device) for n in input_names
            ]
            with torch.no_grad():
                outs = package(*args)
            return {n: o.cpu().numpy() for n, o in zip(output_names, outs, strict=True)}

        return run


def _compute_capability(meta: Mapping[str, str]) -> str:
    recorded = meta.get("AOTI_COMPUTE_CAPABILITY", "")
    if recorded:
        # AOTInductor writes it as "90" for 9.0; the fleet's hosts say "9.0".
        return f"{recorded[:-1]}.{recorded[-1]}" if recorded.isdigit() else recorded
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"
