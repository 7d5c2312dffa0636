"""The ONNX Runtime target: the ONNX graph with ORT's graph optimisations applied offline."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from compilers.errors import BuildError
from compilers.signature import ModelSignature
from compilers.targets import CompiledArtifact, CompileTarget, Runner

__all__ = ["ARTIFACT_FILE", "OnnxRuntimeTarget"]

#: The file name of the artifact.
ARTIFACT_FILE = "model.ort.onnx"

# EXTENDED, not ALL: the level above it adds layout optimisations (NCHWc blocked
# convolutions) whose block size follows the build host's vector width (AVX2 vs
# AVX-512), so a graph saved with them is tied to hosts like the build host.
# EXTENDED's fusions (Conv+activation, Gemm+activation, ...) are contrib ops with
# CPU kernels on every ONNX Runtime build. A host may still apply layout
# optimisations online, for itself, when it loads the artifact.
_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "ORT_DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "ORT_ENABLE_BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "ORT_ENABLE_EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "ORT_ENABLE_ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_DEFAULT_LEVEL = "ORT_ENABLE_EXTENDED"
_PROVIDERS = ["CPUExecutionProvider"]


class OnnxRuntimeTarget(CompileTarget):
    """Optimise an ONNX graph with ONNX Runtime (CPU) and save the result as the artifact.

    Options: ``graph_optimization_level`` (a ``GraphOptimizationLevel`` name;
    default ``ORT_ENABLE_EXTENDED``).
    """

    name: ClassVar[str] = "onnxruntime"

    def compile(
        self,
        onnx_path: Path,
        out_dir: Path,
        signature: ModelSignature,
        options: Mapping[str, Any] | None = None,
    ) -> CompiledArtifact:
        """Write ``out_dir/model.ort.onnx``, the graph as ORT optimised it."""
        options = dict(options or {})
        level = options.pop("graph_optimization_level", _DEFAULT_LEVEL)
        if options:
            raise BuildError(f"unknown onnxruntime target options: {sorted(options)}")
        if level not in _LEVELS:
            raise BuildError(
                f"unknown graph_optimization_level {level!r}; known: {', '.join(_LEVELS)}"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        artifact = out_dir / ARTIFACT_FILE
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = _LEVELS[level]
        session_options.optimized_model_filepath = str(artifact)
        # Creating the session optimises the graph and writes it out.
        session = ort.InferenceSession(str(onnx_path), session_options, providers=_PROVIDERS)
        names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
        if names != (signature.input_names, signature.output_names):
            raise BuildError(
                f"ONNX Runtime sees inputs {names[0]} and outputs {names[1]}, the signature "
                f"says {signature.input_names} and {signature.output_names}"
            )
        return CompiledArtifact(
            path=artifact,
            options={
                "graph_optimization_level": level,
                "onnxruntime_version": ort.__version__,
                "providers": list(_PROVIDERS),
            },
        )

    def load(self, artifact_path: Path) -> Runner:
        """An ONNX Runtime CPU session on the artifact, as a runner."""
        # Default session options, as a serving host loads it: parity then covers
        # the optimisations a host applies online on top of the saved ones.
        session = ort.InferenceSession(str(artifact_path), providers=_PROVIDERS)
        output_names = [o.name for o in session.get_outputs()]

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            outputs = session.run(output_names, dict(inputs))
            return dict(zip(output_names, outputs, strict=True))

        return run
