"""The TensorRT target: ONNX -> a serialized TensorRT engine (``.plan``) for this host's GPU.

An engine runs only on the GPU kind (compute capability) and TensorRT version that
built it, at the precision it was built for: those three make its cache key, which
the artifact's options record and the executor checks. Built engines are kept in an
engine cache directory by key, profile and ONNX digest, so a fleet's build hosts
(one per GPU kind) each build their engine once and a build for a key that is
already there is skipped. ``tensorrt`` and ``torch`` (device buffers) are imported
only when this target builds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from compilers.errors import BuildError
from compilers.signature import ModelSignature
from compilers.targets import BuildSource, CompiledArtifact, CompileTarget, Runner

__all__ = [
    "DEFAULT_CACHE_DIR",
    "PRECISIONS",
    "TensorRtTarget",
    "context_count",
    "engine_cache_key",
    "engine_file",
    "optimisation_profile",
]

#: Where engines and timing caches are kept between builds (``$FERMION_TRT_CACHE`` wins).
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "fermion" / "tensorrt"
#: Precisions an engine can be built at.
PRECISIONS = ("fp32", "tf32", "fp16", "int8")
_OPTIONS = frozenset(
    {
        "precision",
        "workspace_mb",
        "opt_batch_size",
        "contexts",
        "calibration_file",
        "cache_dir",
        "device",
    }
)
_DEFAULT_WORKSPACE_MB = 1024
_DEFAULT_CONTEXTS = 2
_MAX_CONTEXTS = 16
_CALIBRATION_BATCH = 32


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise BuildError(f"TensorRT precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def engine_cache_key(compute_capability: str, tensorrt_version: str, precision: str) -> str:
    """The cache key of an engine, e.g. ``sm90-trt10.3.0-fp16``."""
    _check_precision(precision)
    return f"sm{compute_capability.replace('.', '')}-trt{tensorrt_version}-{precision}"


def engine_file(key: str) -> str:
    """The stored file name of the engine for ``key``."""
    return f"model.{key}.plan"


def optimisation_profile(max_batch_size: int, opt_batch_size: int | None) -> tuple[int, int, int]:
    """The (min, opt, max) batch of the engine's profile; opt defaults to the max."""
    if max_batch_size < 1:
        return (1, 1, 1)
    opt = max_batch_size if opt_batch_size is None else opt_batch_size
    if not 1 <= opt <= max_batch_size:
        raise BuildError(f"opt_batch_size {opt} must be in [1, max_batch_size={max_batch_size}]")
    return (1, opt, max_batch_size)


def context_count(value: Any) -> int:
    """How many identical optimisation profiles to build: one per concurrent context.

    TensorRT lets only one execution context at a time use a profile of an engine
    with dynamic shapes, so an engine that runs N batches at once needs N profiles.
    """
    count = _DEFAULT_CONTEXTS if value is None else value
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= _MAX_CONTEXTS:
        raise BuildError(f"contexts must be an integer in [1, {_MAX_CONTEXTS}], not {value!r}")
    return count


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_dir(opts: Mapping[str, Any]) -> Path:
    configured = opts.get("cache_dir") or os.environ.get("FERMION_TRT_CACHE")
    return Path(configured) if configured else DEFAULT_CACHE_DIR


def _shape(spec_shape: list[int], batch: int) -> tuple[int, ...]:
    return tuple(batch if i == 0 and d == -1 else d for i, d in enumerate(spec_shape))


def _calibration_batches(source: BuildSource, file: str, batch: int) -> list[dict[str, np.ndarray]]:
    path = source.files.get(file)
    if path is None:
        raise BuildError(
            f"int8 calibrates on {file!r}, which is not among the files published with the "
            f"model ({sorted(source.files)}); add it with --file"
        )
    with np.load(path, allow_pickle=False) as npz:
        arrays = {n: npz[n] for n in source.signature.input_names if n in npz.files}
    missing = [n for n in source.signature.input_names if n not in arrays]
    if missing:
        raise BuildError(f"calibration set {file!r} has no array for input(s) {missing}")
    n = min(len(a) for a in arrays.values())
    return [
        {k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, n - batch + 1, batch)
    ]


def _make_calibrator(
    trt: Any, torch: Any, batches: list[dict[str, np.ndarray]], cache_path: Path
) -> Any:
    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        """Feeds the calibration set to TensorRT, one device batch at a time."""

        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(batches)
            self._device: dict[str, Any] = {}

        def get_batch_size(self) -> int:
            return len(next(iter(batches[0].values())))

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None
            self._device = {n: torch.from_numpy(batch[n]).cuda() for n in names}
            return [int(self._device[n].data_ptr()) for n in names]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path.exists() else None

        def write_calibration_cache(self, cache: Any) -> None:
            cache_path.write_bytes(bytes(cache))

    return _EntropyCalibrator()


class TensorRtTarget(CompileTarget):
    """Build a TensorRT engine from the ONNX graph on this host's GPU.

    Options: ``precision`` (``fp32``, ``tf32``, ``fp16``, ``int8``; default ``fp16``),
    ``workspace_mb`` (builder memory pool limit; default 1024), ``opt_batch_size``
    (the profile's opt batch; default the max batch), ``contexts`` (how many batches
    the engine runs at once, one identical profile each; default 2),
    ``calibration_file`` (int8: an ``.npz`` published with the model, one array per
    input), ``cache_dir`` (engine and timing caches) and ``device`` (CUDA device
    index; default 0).
    """

    name: ClassVar[str] = "tensorrt"

    def compile(
        self,
        onnx_path: Path,
        out_dir: Path,
        signature: ModelSignature,
        options: Mapping[str, Any] | None = None,
    ) -> CompiledArtifact:
        """Build an engine with a batch profile of 1 (no batching)."""
        return self.build(BuildSource(onnx_path, signature, max_batch_size=0), out_dir, options)

    def build(
        self, source: BuildSource, out_dir: Path, options: Mapping[str, Any] | None = None
    ) -> CompiledArtifact:
        """Build (or take from the engine cache) the engine for this GPU, TensorRT, precision."""
        opts = dict(options or {})
        unknown = sorted(set(opts) - _OPTIONS)
        if unknown:
            raise BuildError(
                f"unknown tensorrt target options: {unknown}; known: {sorted(_OPTIONS)}"
            )
        # Options are checked before anything is imported, so a bad one fails on any host.
        precision = _check_precision(str(opts.get("precision", "fp16")))
        profile = optimisation_profile(source.max_batch_size, opts.get("opt_batch_size"))
        contexts = context_count(opts.get("contexts"))
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise BuildError(
                f"the tensorrt target needs tensorrt and torch with CUDA: {exc} "
                "(pip install 'fermion[tensorrt]' --extra-index-url https://pypi.nvidia.com)"
            ) from exc
        if not torch.cuda.is_available():
            raise BuildError("the tensorrt target builds on a CUDA GPU; this host has none")
        device = int(opts.get("device", 0))
        torch.cuda.set_device(device)
        major, minor = torch.cuda.get_device_capability(device)
        key = engine_cache_key(f"{major}.{minor}", trt.__version__, precision)
        cache_dir = _cache_dir(opts)
        cache_dir.mkdir(parents=True, exist_ok=True)
        digest = _digest(source.onnx_path)
        batches = "-".join(map(str, profile))
        cached = cache_dir / f"{digest[:16]}-{key}-b{batches}-x{contexts}.plan"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / engine_file(key)
        reused = cached.exists()
        if not reused:
            plan = _build_engine(
                trt, torch, source, opts, precision, profile, contexts, cache_dir, key
            )
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(plan)
            tmp.replace(cached)
        shutil.copyfile(cached, path)
        return CompiledArtifact(
            path=path,
            options={
                "device": "cuda",
                "precision": precision,
                "compute_capability": f"{major}.{minor}",
                "tensorrt_version": trt.__version__,
                "cache_key": key,
                "profile": {"min": profile[0], "opt": profile[1], "max": profile[2]},
                "contexts": contexts,
                "workspace_mb": int(opts.get("workspace_mb", _DEFAULT_WORKSPACE_MB)),
                "gpu": torch.cuda.get_device_name(device),
                "engine_reused": reused,
            },
        )

    def load(self, artifact_path: Path) -> Runner:
        """The engine deserialised on the GPU, as a synchronous runner (for parity)."""
        import tensorrt as trt
        import torch

        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(artifact_path.read_bytes())
        if engine is None:
            raise BuildError(f"TensorRT cannot deserialise {artifact_path.name}")
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]

        def run(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            keep = {}
            for n in inputs:
                keep[n] = torch.from_numpy(np.ascontiguousarray(arrays[n])).cuda()
                context.set_input_shape(n, tuple(keep[n].shape))
                context.set_tensor_address(n, keep[n].data_ptr())
            for n in outputs:
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
                shape = tuple(context.get_tensor_shape(n))
                keep[n] = torch.from_numpy(np.empty(shape, dtype)).cuda()
                context.set_tensor_address(n, keep[n].data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise BuildError(f"TensorRT failed to run {artifact_path.name}")
            stream.synchronize()
            return {n: keep[n].cpu().numpy() for n in outputs}

        return run


def _build_engine(
    trt: Any,
    torch: Any,
    source: BuildSource,
    opts: Mapping[str, Any],
    precision: str,
    profile_batches: tuple[int, int, int],
    contexts: int,
    cache_dir: Path,
    key: str,
) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; 8.x needed the flag.
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT's ONNX parser rejects the graph: {errors}")
    config = builder.create_builder_config()
    workspace = int(opts.get("workspace_mb", _DEFAULT_WORKSPACE_MB)) << 20
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    built = []
    for _ in range(contexts):  # identical profiles, one per concurrent execution context
        profile = builder.create_optimization_profile()
        for spec in source.signature.inputs:
            shapes = [_shape(spec.shape, b) for b in profile_batches]
            profile.set_shape(spec.name, *shapes)
        config.add_optimization_profile(profile)
        built.append(profile)
    if precision != "tf32":
        # fp32 means fp32: TensorRT would otherwise use TF32 on Ampere and later.
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        file = opts.get("calibration_file")
        if not file:
            raise BuildError("int8 needs calibration_file: an .npz published with the model")
        rows = min(_CALIBRATION_BATCH, profile_batches[2])  # a batch the profile accepts
        batches = _calibration_batches(source, str(file), rows)
        if not batches:
            raise BuildError(f"calibration set {file!r} has fewer than {rows} rows")
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # layers INT8 cannot run fall back to FP16
        calibration_cache = cache_dir / f"{key}-{_digest(source.onnx_path)[:16]}.calib"
        config.int8_calibrator = _make_calibrator(trt, torch, batches, calibration_cache)
        config.set_calibration_profile(built[0])
    timing_path = cache_dir / f"timing-{key.rsplit('-', 1)[0]}.cache"
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.exists() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError("TensorRT could not build an engine (see its log above)")
    timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)
