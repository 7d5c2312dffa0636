"""Compile targets: a table from a target name to the class that compiles for it.

A target's module is imported only when the target is chosen, so the heavy
toolchains (TensorRT, torch) load only on hosts that build for them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from compilers.errors import UnknownTargetError
from compilers.signature import ModelSignature
from model_store.importer import import_from_string

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "COMPILE_TARGETS",
    "BuildSource",
    "CompileTarget",
    "CompiledArtifact",
    "Runner",
    "get_target",
]

#: Target name -> "module:Class" of its CompileTarget.
COMPILE_TARGETS: dict[str, str] = {
    "onnxruntime": "compilers.targets.onnxruntime:OnnxRuntimeTarget",
    "torch": "compilers.targets.torch:TorchTarget",
    "tensorrt": "compilers.targets.tensorrt:TensorRtTarget",
}

#: Runs a loaded artifact: input name -> array in, output name -> array out.
Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class CompiledArtifact:
    """A compiled artifact file and what a host needs to know to run it."""

    path: Path
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildSource:
    """Everything a build has beside the ONNX graph, for targets that need more of it."""

    #: The exported (or given) ONNX graph.
    onnx_path: Path
    signature: ModelSignature
    #: The most rows a batch may have (0: the model takes no batch axis).
    max_batch_size: int
    #: The torch module the graph was exported from; None when built from an ONNX file.
    module: nn.Module | None = None
    #: Extra files published with the version, by stored name (e.g. calibration sets).
    files: Mapping[str, Path] = field(default_factory=dict)


class CompileTarget(ABC):
    """Turns an ONNX model into an artifact for one runtime, and runs that artifact."""

    #: The name of the target in ``COMPILE_TARGETS`` and in the manifest.
    name: ClassVar[str]

    @abstractmethod
    def compile(
        self,
        onnx_path: Path,
        out_dir: Path,
        signature: ModelSignature,
        options: Mapping[str, Any] | None = None,
    ) -> CompiledArtifact:
        """Compile ``onnx_path`` into a new file under ``out_dir``."""

    def build(
        self, source: BuildSource, out_dir: Path, options: Mapping[str, Any] | None = None
    ) -> CompiledArtifact:
        """Compile from everything the build has; by default, from the ONNX graph alone."""
        return self.compile(source.onnx_path, out_dir, source.signature, options)

    @abstractmethod
    def load(self, artifact_path: Path) -> Runner:
        """Load a compiled artifact once, for many runs."""

    def run(self, artifact_path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a compiled artifact once on ``inputs``."""
        return self.load(artifact_path)(inputs)


def get_target(name: str) -> CompileTarget:
    """The compile target called ``name``, its module imported now."""
    spec = COMPILE_TARGETS.get(name)
    if spec is None:
        known = ", ".join(sorted(COMPILE_TARGETS))
        raise UnknownTargetError(f"unknown compile target {name!r}; known targets: {known}")
    try:
        cls = import_from_string(spec)
    except (ValueError, ImportError, AttributeError) as exc:
        raise UnknownTargetError(
            f"compile target {name!r} cannot be loaded from {spec!r}: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, CompileTarget)):
        raise UnknownTargetError(f"{spec!r} is not a CompileTarget")
    target: CompileTarget = cls()
    return target
