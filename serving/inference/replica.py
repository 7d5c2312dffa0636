"""A replica: the artifact that fits this host, loaded, verified and warmed up."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model_store.manifest import V2_DATATYPES, Artifact, ModelManifest, TensorSpec
from model_store.store import ModelStore
from serving.inference import hosts
from serving.inference.executors import (
    EXECUTORS,
    Executor,
    ExecutorOptions,
    HostInfo,
    load_executor_class,
)

__all__ = [
    "ArtifactChoice",
    "ModelReplica",
    "NoFittingArtifact",
    "detect_host",
    "needs_gpu",
    "preference_order",
    "select_artifact",
]

log = logging.getLogger("fermion.replica")


class NoFittingArtifact(RuntimeError):
    """No artifact of the manifest can run on this host; the message says why, per artifact."""


@dataclass(frozen=True)
class ArtifactChoice:
    """The artifact chosen for this host, its executor, and why others were passed over."""

    artifact: Artifact
    executor: type[Executor]
    skipped: dict[str, str] = field(default_factory=dict)


def detect_host() -> HostInfo:
    """Describe this host (GPUs, installed runtimes, CPU flags) without importing a runtime."""
    return hosts.detect_host()


def _preference(artifact: Artifact, rank: Mapping[str, int]) -> int:
    # "target:device" (e.g. "torch:cuda") ranks before a bare "target" entry.
    device = str(artifact.options.get("device", "cpu"))
    qualified = rank.get(f"{artifact.target}:{device}")
    return qualified if qualified is not None else rank.get(artifact.target, len(rank))


def preference_order(manifest: ModelManifest, prefer: Sequence[str]) -> list[Artifact]:
    """The manifest's artifacts in order of ``prefer``, then manifest order."""
    rank: dict[str, int] = {}
    for i, entry in enumerate(prefer):
        rank.setdefault(entry, i)
    ordered = sorted(
        enumerate(manifest.artifacts), key=lambda ia: (_preference(ia[1], rank), ia[0])
    )
    return [artifact for _, artifact in ordered]


def needs_gpu(artifact: Artifact) -> bool:
    """Whether ``artifact`` runs only on a CUDA GPU."""
    return artifact.target == "tensorrt" or artifact.options.get("device") == "cuda"


def select_artifact(
    manifest: ModelManifest, prefer: Sequence[str], host: HostInfo
) -> ArtifactChoice:
    """Pick the first artifact, in order of ``prefer`` then manifest order, that fits ``host``.

    An entry of ``prefer`` is a target (``torch``) or a target on a device
    (``torch:cuda``, ``torch:cpu``; an artifact without a device runs on the CPU).
    """
    skipped: dict[str, str] = {}
    for artifact in preference_order(manifest, prefer):
        key = f"{artifact.target}:{artifact.file}"
        if artifact.target not in EXECUTORS:
            skipped[key] = f"no executor for target {artifact.target!r} in this build"
            continue
        try:
            executor = load_executor_class(artifact.target)
        except ImportError as e:
            skipped[key] = f"runtime not installed ({e})"
            continue
        reason = executor.unfit_reason(artifact, host)
        if reason is not None:
            skipped[key] = reason
            continue
        return ArtifactChoice(artifact, executor, skipped)
    detail = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    raise NoFittingArtifact(
        f"no artifact of {manifest.name} version {manifest.version} fits this host ({detail})"
    )


def _warmup_inputs(specs: Sequence[TensorSpec], rows: int, batched: bool) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        dims = [max(d, 1) for d in spec.shape]
        if batched:
            dims[0] = rows
        dtype = V2_DATATYPES[spec.datatype].numpy
        if spec.datatype == "BYTES":
            inputs[spec.name] = np.full(dims, b"", dtype=object)
        else:
            inputs[spec.name] = np.zeros(dims, dtype=dtype)
    return inputs


class ModelReplica:
    """Loads one model version's best-fitting artifact and runs batches on it."""

    def __init__(
        self,
        store: ModelStore,
        manifest: ModelManifest,
        *,
        prefer: Sequence[str],
        options: ExecutorOptions,
        host: HostInfo | None = None,
    ) -> None:
        self.manifest = manifest
        self.choice = select_artifact(manifest, prefer, host or detect_host())
        path = store.artifact_path(manifest, self.choice.artifact, verify=True)
        started = time.perf_counter()
        self._executor = self.choice.executor(path, manifest, self.choice.artifact, options)
        self.load_seconds = time.perf_counter() - started
        self.warmup_seconds = self._warmup()

    def _warmup(self) -> float:
        started = time.perf_counter()
        batched = self.manifest.max_batch_size > 0
        sizes = sorted({1, self.manifest.max_batch_size}) if batched else [1]
        for rows in sizes:
            self.run(_warmup_inputs(self.manifest.inputs, rows, batched))
        return time.perf_counter() - started

    def describe(self) -> dict[str, Any]:
        """What was chosen and why, for the model config endpoint."""
        return {
            "target": self.choice.artifact.target,
            "file": self.choice.artifact.file,
            "executor": self.choice.executor.__name__,
            "options": dict(self.choice.artifact.options),
            "runtime": self._executor.describe(),
            "skipped": dict(self.choice.skipped),
            "load_seconds": round(self.load_seconds, 4),
            "warmup_seconds": round(self.warmup_seconds, 4),
        }

    @property
    def executor(self) -> Executor:
        """The executor of the chosen artifact (the backend calls its ``run`` per batch)."""
        return self._executor

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compute one batch."""
        return self._executor.run(inputs)

    def close(self) -> None:
        """Release the executor."""
        self._executor.close()
