"""A compile target that miscompiles on purpose: it scales every weight of the graph."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import numpy_helper

from compilers.signature import ModelSignature
from compilers.targets import CompiledArtifact, CompileTarget, Runner
from compilers.targets.onnxruntime import OnnxRuntimeTarget

__all__ = ["ScaledWeightsTarget"]


class ScaledWeightsTarget(CompileTarget):
    """Writes the graph with every float weight times ``scale`` (option; default 1.05)."""

    name: ClassVar[str] = "faulty"

    def compile(
        self,
        onnx_path: Path,
        out_dir: Path,
        signature: ModelSignature,
        options: Mapping[str, Any] | None = None,
    ) -> CompiledArtifact:
        """Write ``out_dir/model.faulty.onnx`` with scaled weights."""
        scale = float((options or {}).get("scale", 1.05))
        model = onnx.load(str(onnx_path))
        for init in model.graph.initializer:
            weights = numpy_helper.to_array(init)
            if np.issubdtype(weights.dtype, np.floating):
                init.CopyFrom(
                    numpy_helper.from_array(weights * weights.dtype.type(scale), init.name)
                )
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "model.faulty.onnx"
        onnx.save(model, str(path))
        return CompiledArtifact(path=path, options={"scale": scale})

    def load(self, artifact_path: Path) -> Runner:
        """Run the artifact with ONNX Runtime."""
        return OnnxRuntimeTarget().load(artifact_path)
