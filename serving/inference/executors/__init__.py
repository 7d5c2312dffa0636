"""Executors run one artifact. Heavy runtimes load by name from a table, only when chosen."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_store.importer import import_from_string
from model_store.manifest import Artifact, ModelManifest
from serving.inference.hosts import HostInfo

__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorOptions",
    "HostInfo",
    "load_executor_class",
]

#: Artifact target -> "module:Class". Nothing here is imported until a target is chosen.
EXECUTORS: dict[str, str] = {
    "onnxruntime": "serving.inference.executors.onnxruntime:OnnxRuntimeExecutor",
    "torch": "serving.inference.executors.torch:TorchExecutor",
    "tensorrt": "serving.inference.executors.tensorrt:TensorRtExecutor",
}


@dataclass(frozen=True)
class ExecutorOptions:
    """Host-side knobs for an executor."""

    intra_op_threads: int = 1


class Executor(ABC):
    """Runs one compiled artifact on a batch of named numpy inputs."""

    #: The artifact target this executor runs.
    target: str = ""

    @classmethod
    def unfit_reason(cls, artifact: Artifact, host: HostInfo) -> str | None:
        """Why ``artifact`` cannot run on ``host``, or None when it can."""
        return None

    @abstractmethod
    def __init__(
        self, path: Path, manifest: ModelManifest, artifact: Artifact, options: ExecutorOptions
    ) -> None: ...

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compute every output for one batch. Thread-safe for concurrent batches."""

    def describe(self) -> dict[str, Any]:
        """Where and how this executor runs, for the model config endpoint (empty by default)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release the runtime's resources."""


def load_executor_class(target: str) -> type[Executor]:
    """Import and return the executor class for ``target``."""
    try:
        spec = EXECUTORS[target]
    except KeyError:
        raise KeyError(f"no executor for target {target!r}; known: {sorted(EXECUTORS)}") from None
    cls = import_from_string(spec)
    if not (isinstance(cls, type) and issubclass(cls, Executor)):
        raise TypeError(f"{spec} is not an Executor")
    return cls
