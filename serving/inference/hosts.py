"""Describe this host (GPUs, installed runtimes, CPU flags) without importing any runtime.

GPUs come from ``nvidia-smi`` when it is on the PATH, runtimes from the installed
distributions' metadata and CPU flags from ``/proc/cpuinfo``: none of it loads torch,
TensorRT or a CUDA library into the serving process.
"""

from __future__ import annotations

import importlib.metadata as md
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "RUNTIME_DISTRIBUTIONS",
    "HostInfo",
    "cuda_compute_capabilities",
    "detect_host",
    "torch_has_cuda",
]

#: Runtime -> the distributions that provide it, first installed wins.
RUNTIME_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnxruntime-gpu": ("onnxruntime-gpu",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12_bindings"),
    "torch": ("torch",),
}


@dataclass(frozen=True)
class HostInfo:
    """What this host can run: GPUs (compute capabilities) and installed runtimes."""

    #: One entry per GPU, e.g. ``("9.0", "8.6")``.
    cuda_compute_capabilities: tuple[str, ...] = ()
    #: Installed distribution -> version, e.g. ``{"torch": "2.13.0+cu128"}``.
    runtimes: Mapping[str, str] = field(default_factory=dict)
    #: CPU instruction-set flags (lower case, as in /proc/cpuinfo), e.g. ``avx2``.
    cpu_flags: frozenset[str] = frozenset()


_NVIDIA_SMI_TIMEOUT_S = 10.0
_CPUINFO = Path("/proc/cpuinfo")


def cuda_compute_capabilities() -> tuple[str, ...]:
    """One compute capability per visible GPU (e.g. ``"9.0"``), from nvidia-smi; () if none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        done = subprocess.run(
            [exe, "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=_NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if done.returncode != 0:
        return ()
    return tuple(line.strip() for line in done.stdout.splitlines() if line.strip())


def _installed_runtimes() -> dict[str, str]:
    runtimes: dict[str, str] = {}
    for runtime, dists in RUNTIME_DISTRIBUTIONS.items():
        for dist in dists:
            try:
                runtimes[runtime] = md.version(dist)
                break
            except md.PackageNotFoundError:
                continue
    return runtimes


def _cpu_flags() -> frozenset[str]:
    try:
        text = _CPUINFO.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def torch_has_cuda(torch_version: str | None) -> bool:
    """Whether an installed torch (by its version, e.g. ``2.13.0+cpu``) is a CUDA build.

    Wheels name their variant after ``+``: ``cpu`` has no CUDA, ``cuXYZ`` has it; the
    default PyPI wheel for Linux (no suffix) is a CUDA build.
    """
    if not torch_version:
        return False
    variant = torch_version.partition("+")[2]
    return variant == "" or variant.startswith("cu")


def detect_host() -> HostInfo:
    """Describe this host: its GPUs, installed runtimes and CPU flags."""
    return HostInfo(
        cuda_compute_capabilities=cuda_compute_capabilities(),
        runtimes=_installed_runtimes(),
        cpu_flags=_cpu_flags(),
    )
