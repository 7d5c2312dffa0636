"""ONNX Runtime executor: runs an ``onnxruntime`` artifact on the CPU."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_store.manifest import Artifact, ModelManifest
from serving.inference.executors import Executor, ExecutorOptions, HostInfo

__all__ = ["OnnxRuntimeExecutor"]


class OnnxRuntimeExecutor(Executor):
    """One InferenceSession per replica; ``run`` is safe from several threads."""

    target = "onnxruntime"

    @classmethod
    def unfit_reason(cls, artifact: Artifact, host: HostInfo) -> str | None:
        wanted = artifact.options.get("providers", ["CPUExecutionProvider"])
        available = set(ort.get_available_providers())
        if not any(p in available for p in wanted):
            return f"none of the providers {wanted} is available (have {sorted(available)})"
        return None

    def __init__(
        self, path: Path, manifest: ModelManifest, artifact: Artifact, options: ExecutorOptions
    ) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning worker threads would steal the core the event loop needs.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        wanted = artifact.options.get("providers", ["CPUExecutionProvider"])
        providers = [p for p in wanted if p in ort.get_available_providers()]
        self._session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        graph_inputs = {i.name for i in self._session.get_inputs()}
        missing = [t.name for t in manifest.inputs if t.name not in graph_inputs]
        if missing:
            raise ValueError(f"artifact {artifact.file} has no input(s) {missing}")
        self._output_names = [t.name for t in manifest.outputs]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._output_names, dict(inputs))
        return dict(zip(self._output_names, results, strict=True))
