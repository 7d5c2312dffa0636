"""torch executor: runs an AOTInductor package (``torch`` artifact) on the CPU or a CUDA GPU.

torch itself is imported only when a package is loaded (choosing an artifact reads
``unfit_reason`` alone): serving a model through another executor never loads it.
On CUDA, batches are padded up to the next captured batch size and replayed as CUDA
graphs (one per size, captured at load), with inputs staged through pinned host
memory; when capture fails, or the model takes no batch axis, every batch runs
eagerly on a CUDA stream of its thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model_store.manifest import V2_DATATYPES, Artifact, ModelManifest, TensorSpec
from serving.inference.executors import Executor, ExecutorOptions, HostInfo
from serving.inference.hosts import torch_has_cuda

if TYPE_CHECKING:
    import torch

__all__ = ["TorchExecutor", "graph_batch_sizes"]

log = logging.getLogger("fermion.executors.torch")

_AVX512 = ("avx512f", "avx512dq", "avx512vl", "avx512bw", "fma")
_AMX = ("amx_tile", "amx_bf16", "amx_int8")
#: Manifests written before ``cpu_flags`` hold only Inductor's ISA name (``cpu_isa``):
#: the CPU flags (as /proc/cpuinfo names them) that the kernels of each need.
_LEGACY_ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": _AVX512,
    "avx512 avx512_vnni": (*_AVX512, "avx512_vnni"),
    "avx512 avx512_vnni amx_tile": (*_AVX512, "avx512_vnni", *_AMX),
    "amx": (*_AVX512, "avx512_vnni", *_AMX),
    "asimd": ("asimd",),
    "invalid_vec_isa": (),
}


def _needed_cpu_flags(options: Mapping[str, Any]) -> frozenset[str] | str:
    """The CPU flags a CPU package needs, or why they cannot be known."""
    recorded = options.get("cpu_flags")
    if recorded is not None:
        if not isinstance(recorded, list) or not all(isinstance(f, str) for f in recorded):
            return f"its cpu_flags {recorded!r} are not a list of CPU flag names"
        return frozenset(recorded)
    isa = options.get("cpu_isa")
    if not isinstance(isa, str) or isa.strip().lower() not in _LEGACY_ISA_FLAGS:
        return (
            f"built for an unknown CPU instruction set (cpu_isa {isa!r}); "
            "rebuild it to record the CPU flags it needs"
        )
    return frozenset(_LEGACY_ISA_FLAGS[isa.strip().lower()])


def _release(version: str) -> tuple[str, ...]:
    return tuple(version.partition("+")[0].split(".")[:2])


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes captured as CUDA graphs: powers of two up to the max, and the max."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_size] if max_batch_size > 0 else []


class _CudaGraph:
    """One captured run at a fixed batch size, with its static and pinned buffers."""

    def __init__(
        self, package: Any, specs: Sequence[TensorSpec], rows: int, device: torch.device
    ) -> None:
        import torch

        self.rows = rows
        self.static_in = [
            torch.zeros((rows, *s.shape[1:]), dtype=_dtype(s), device=device) for s in specs
        ]
        self.pinned_in = [torch.empty_like(t, device="cpu").pin_memory() for t in self.static_in]
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self.stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.stream):
            for _ in range(2):  # warm-up before capture, as CUDA graphs require
                package(*self.static_in)
        self.stream.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):
            self.static_out: list[torch.Tensor] = list(package(*self.static_in))
        self.pinned_out = [torch.empty_like(t, device="cpu").pin_memory() for t in self.static_out]

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch

        n = len(arrays[0])
        with torch.cuda.stream(self.stream):
            for pinned, static, array in zip(self.pinned_in, self.static_in, arrays, strict=True):
                pinned[:n].numpy()[...] = array
                static[:n].copy_(pinned[:n], non_blocking=True)
            self.graph.replay()
            for pinned, static in zip(self.pinned_out, self.static_out, strict=True):
                pinned[:n].copy_(static[:n], non_blocking=True)
        self.stream.synchronize()
        return [pinned[:n].numpy().copy() for pinned in self.pinned_out]


def _dtype(spec: TensorSpec) -> torch.dtype:
    import torch

    dtype: torch.dtype = torch.from_numpy(np.zeros(0, V2_DATATYPES[spec.datatype].numpy)).dtype
    return dtype


class TorchExecutor(Executor):
    """Loads a ``.pt2`` package once per replica; ``run`` is safe from several threads."""

    target = "torch"

    @classmethod
    def unfit_reason(cls, artifact: Artifact, host: HostInfo) -> str | None:
        installed = host.runtimes.get("torch")
        if installed is None:
            return "torch is not installed on this host"
        built = str(artifact.options.get("torch_version", ""))
        if built and _release(built) != _release(installed):
            return (
                f"built with torch {built}, this host has torch {installed} "
                "(an AOTInductor package runs on the torch release that built it)"
            )
        device = artifact.options.get("device", "cpu")
        if device == "cuda":
            if not torch_has_cuda(installed):
                return f"a CUDA package; this host's torch {installed} is built without CUDA"
            wanted = str(artifact.options.get("compute_capability", ""))
            if not host.cuda_compute_capabilities:
                return f"a CUDA package for compute capability {wanted}; this host has no GPU"
            if wanted not in host.cuda_compute_capabilities:
                have = ", ".join(host.cuda_compute_capabilities)
                return f"built for compute capability {wanted}; this host's GPUs are {have}"
            return None
        if device != "cpu":
            return f"unknown device {device!r}"
        needed = _needed_cpu_flags(artifact.options)
        if isinstance(needed, str):
            return needed
        missing = sorted(needed - host.cpu_flags)
        if not missing:
            return None
        if not host.cpu_flags:
            return f"built for CPUs with {', '.join(missing)}; this host's CPU flags are unknown"
        return f"built for CPUs with {', '.join(missing)}; this host's CPU lacks them"

    def __init__(
        self, path: Path, manifest: ModelManifest, artifact: Artifact, options: ExecutorOptions
    ) -> None:
        import torch

        self._torch = torch
        self._inputs = list(manifest.inputs)
        self._outputs = list(manifest.outputs)
        self._output_names = [t.name for t in manifest.outputs]
        self._cuda = artifact.options.get("device", "cpu") == "cuda"
        self._graphs: list[_CudaGraph] = []
        self._graph_lock = threading.Lock()
        self._local = threading.local()
        #: Held around eager runs of a package loaded for capture (not thread-safe).
        self._eager_lock: threading.Lock | None = None
        if not self._cuda:
            if options.intra_op_threads > 0:
                torch.set_num_threads(options.intra_op_threads)
            self._device = torch.device("cpu")
            self._package = torch._inductor.aoti_load_package(str(path))
        else:
            self._device = torch.device("cuda", torch.cuda.current_device())
            package = None
            if manifest.max_batch_size > 0:
                # One copy of the weights on the GPU: the package loaded without its own
                # thread synchronisation (which capture needs) also serves eager runs.
                single = torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
                self._graphs = self._capture(single, manifest.max_batch_size)
                if self._graphs:
                    package, self._eager_lock = single, threading.Lock()
                else:
                    del single
                    torch.cuda.empty_cache()
            if package is None:
                package = torch._inductor.aoti_load_package(str(path))
            self._package = package
        self._check_names(path)

    def _check_names(self, path: Path) -> None:
        meta = self._package.get_metadata()
        for key, specs in (("fermion_inputs", self._inputs), ("fermion_outputs", self._outputs)):
            names = json.loads(meta.get(key, "null"))
            wanted = [t.name for t in specs]
            if names is not None and names != wanted:
                raise ValueError(f"artifact {path.name} has {key[8:]} {names}, not {wanted}")

    def _capture(self, single: Any, max_batch_size: int) -> list[_CudaGraph]:
        torch = self._torch
        try:
            with torch.no_grad():
                return [
                    _CudaGraph(single, self._inputs, rows, self._device)
                    for rows in graph_batch_sizes(max_batch_size)
                ]
        except RuntimeError as exc:
            log.warning("CUDA graph capture failed, running eagerly: %s", exc)
            return []

    def describe(self) -> dict[str, Any]:
        """The device and the captured CUDA graph batch sizes."""
        return {"device": str(self._device), "cuda_graphs": [g.rows for g in self._graphs]}

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = [inputs[s.name] for s in self._inputs]
        if self._graphs:
            rows = len(arrays[0])
            graph = next((g for g in self._graphs if g.rows >= rows), None)
            if graph is not None:
                with self._graph_lock:
                    outs = graph.run(arrays)
                return dict(zip(self._output_names, outs, strict=True))
        torch = self._torch
        if not self._cuda:
            args = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
            with torch.inference_mode():
                results = self._package(*args)
            return {n: t.numpy() for n, t in zip(self._output_names, results, strict=True)}
        return self._run_cuda_eager(arrays)

    def _run_cuda_eager(self, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self._device)
        with torch.inference_mode(), torch.cuda.stream(stream):
            args = [
                torch.from_numpy(np.ascontiguousarray(a))
                .pin_memory()
                .to(self._device, non_blocking=True)
                for a in arrays
            ]
            if self._eager_lock is None:
                results = self._package(*args)
            else:
                with self._eager_lock:
                    results = self._package(*args)
            host = [r.to("cpu", non_blocking=True) for r in results]
        stream.synchronize()
        return {n: t.numpy() for n, t in zip(self._output_names, host, strict=True)}
