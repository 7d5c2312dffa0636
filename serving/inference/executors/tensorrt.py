"""TensorRT executor: runs a ``tensorrt`` engine on this host's GPU.

``tensorrt`` and ``torch`` are imported only when an engine is loaded (choosing an
artifact reads ``unfit_reason`` alone). The engine is deserialised
once; each concurrent batch takes an execution context of its own, with its own
CUDA stream, device buffers (torch CUDA tensors) sized for the profile's max batch,
and pinned host buffers for the asynchronous copies in and out.

TensorRT lets one execution context at a time use an optimisation profile of an
engine with dynamic shapes, so the target builds the engine with identical profiles
(its ``contexts`` option) and context *i* is bound to profile *i*. Contexts are made
on demand and pooled; a batch that finds all of them busy waits for one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from model_store.manifest import Artifact, ModelManifest, TensorSpec
from serving.inference.executors import Executor, ExecutorOptions, HostInfo
from serving.inference.hosts import torch_has_cuda

__all__ = ["TensorRtExecutor"]


class _Slot:
    """One execution context with its stream and buffers; used by one batch at a time."""

    def __init__(
        self,
        engine: Any,
        specs: Mapping[str, TensorSpec],
        rows: int,
        device: Any,
        profile: int,
    ) -> None:
        import tensorrt as trt
        import torch

        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context (GPU memory?)")
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        if not self.context.set_optimization_profile_async(profile, self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT refused optimisation profile {profile} for a context")
        self.stream.synchronize()
        self.device: dict[str, torch.Tensor] = {}
        self.pinned: dict[str, torch.Tensor] = {}
        for name, spec in specs.items():
            dtype = torch.from_numpy(np.zeros(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
            shape = (rows, *spec.shape[1:]) if spec.shape[0] == -1 else tuple(spec.shape)
            self.device[name] = torch.empty(shape, dtype=dtype, device=device)
            self.pinned[name] = torch.empty(shape, dtype=dtype).pin_memory()
            self.context.set_tensor_address(name, self.device[name].data_ptr())


class TensorRtExecutor(Executor):
    """Runs a TensorRT engine; ``run`` is safe from several threads (one context each)."""

    target = "tensorrt"

    @classmethod
    def unfit_reason(cls, artifact: Artifact, host: HostInfo) -> str | None:
        installed = host.runtimes.get("tensorrt")
        built = str(artifact.options.get("tensorrt_version", ""))
        if installed is None:
            return f"an engine for TensorRT {built}; TensorRT is not installed on this host"
        if built != installed:
            return f"an engine built by TensorRT {built}; this host has TensorRT {installed}"
        if not torch_has_cuda(host.runtimes.get("torch")):
            return "the TensorRT executor needs torch with CUDA for its device buffers"
        wanted = str(artifact.options.get("compute_capability", ""))
        if wanted not in host.cuda_compute_capabilities:
            have = ", ".join(host.cuda_compute_capabilities) or "none"
            return f"an engine for compute capability {wanted}; this host's GPUs: {have}"
        return None

    def __init__(
        self, path: Path, manifest: ModelManifest, artifact: Artifact, options: ExecutorOptions
    ) -> None:
        # Imported here, not at the top: selection reads unfit_reason on any host.
        import tensorrt as trt
        import torch

        dynamic = [t.name for t in (*manifest.inputs, *manifest.outputs) if -1 in t.shape[1:]]
        if dynamic:
            raise ValueError(f"the TensorRT executor needs static non-batch dims; {dynamic} vary")
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise ValueError(f"TensorRT cannot deserialise {artifact.file} on this GPU")
        profile = artifact.options.get("profile", {})
        self._max_rows = int(profile.get("max", max(manifest.max_batch_size, 1)))
        self._inputs = {t.name: t for t in manifest.inputs}
        self._outputs = {t.name: t for t in manifest.outputs}
        names = {self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)}
        missing = sorted((set(self._inputs) | set(self._outputs)) - names)
        if missing:
            raise ValueError(f"engine {artifact.file} has no tensor(s) {missing}")
        self._max_contexts = max(1, int(self._engine.num_optimization_profiles))
        self._slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._unbound = list(range(self._max_contexts))  # profiles no context uses yet
        self._binding = threading.Lock()

    def _slot(self) -> _Slot:
        try:
            return self._slots.get_nowait()
        except queue.Empty:
            pass
        with self._binding:
            profile = self._unbound.pop(0) if self._unbound else None
        if profile is None:
            return self._slots.get()  # every profile is busy: wait for a batch to finish
        try:
            specs = {**self._inputs, **self._outputs}
            return _Slot(self._engine, specs, self._max_rows, self._device, profile)
        except BaseException:
            with self._binding:
                self._unbound.append(profile)
            raise

    def describe(self) -> dict[str, Any]:
        """The GPU, the profile's max batch, and how many batches can run at once."""
        return {
            "device": str(self._device),
            "max_rows": self._max_rows,
            "contexts": self._max_contexts,
        }

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        slot = self._slot()
        try:
            n = len(next(iter(inputs.values())))
            ctx = slot.context
            with torch.cuda.stream(slot.stream):
                for name in self._inputs:
                    array = inputs[name]
                    pinned = slot.pinned[name][:n]
                    pinned.numpy()[...] = array
                    slot.device[name][:n].copy_(pinned, non_blocking=True)
                    ctx.set_input_shape(name, tuple(array.shape))
                if not ctx.execute_async_v3(slot.stream.cuda_stream):
                    raise RuntimeError("TensorRT failed to run the batch")
                rows = {name: int(ctx.get_tensor_shape(name)[0]) for name in self._outputs}
                for name in self._outputs:
                    slot.pinned[name][: rows[name]].copy_(
                        slot.device[name][: rows[name]], non_blocking=True
                    )
            slot.stream.synchronize()
            return {name: slot.pinned[name][: rows[name]].numpy().copy() for name in self._outputs}
        finally:
            slot.stream.synchronize()  # a failed batch's copies end before the slot is reused
            self._slots.put(slot)

    def close(self) -> None:
        while True:
            try:
                self._slots.get_nowait()
            except queue.Empty:
                break
