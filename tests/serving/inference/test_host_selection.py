"""Which artifact a host runs: selection for given host descriptions, and host detection."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from typing import Any

import pytest

from model_store.manifest import Artifact, ModelManifest, TensorSpec
from serving.config import ExecutorConfig
from serving.inference.executors import HostInfo
from serving.inference.hosts import detect_host, torch_has_cuda
from serving.inference.replica import NoFittingArtifact, select_artifact
from tests.helpers.servers import REPO_ROOT

_TORCH = "2.13.0"
_DIGEST = "0" * 64


def _artifact(target: str, file: str, **options: Any) -> Artifact:
    return Artifact(file=file, sha256=_DIGEST, size=1, target=target, options=options)


def _engine(cc: str, trt: str = "10.3.0", precision: str = "fp16") -> Artifact:
    key = f"sm{cc.replace('.', '')}-trt{trt}-{precision}"
    return _artifact(
        "tensorrt",
        f"model.{key}.plan",
        device="cuda",
        precision=precision,
        compute_capability=cc,
        tensorrt_version=trt,
        cache_key=key,
    )


#: A version built for a fleet of H100s (9.0) and A100s (8.0), and for CPUs.
FLEET = ModelManifest(
    name="digits",
    version=1,
    platform="onnxruntime_onnx",
    inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 1, 28, 28])],
    outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
    max_batch_size=64,
    artifacts=[
        _artifact("onnxruntime", "model.ort.onnx", providers=["CPUExecutionProvider"]),
        _artifact(
            "torch", "model.torch-cpu-fp32.pt2", device="cpu", torch_version=_TORCH, cpu_isa="avx2"
        ),
        _engine("9.0"),
        _engine("8.0"),
        _artifact(
            "torch",
            "model.torch-cuda-fp16.pt2",
            device="cuda",
            precision="fp16",
            torch_version=_TORCH,
            compute_capability="9.0",
        ),
    ],
)
PREFER = ExecutorConfig().prefer
#: CPU flags of described hosts, as /proc/cpuinfo lists them.
AVX2_FLAGS = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
AVX512_VNNI_FLAGS = AVX2_FLAGS | {
    "avx512f",
    "avx512dq",
    "avx512vl",
    "avx512bw",
    "avx512cd",
    "avx512_vnni",
}
CPU_HOST = HostInfo(
    runtimes={"onnxruntime": "1.20.0", "torch": f"{_TORCH}+cpu"}, cpu_flags=AVX2_FLAGS
)
H100_HOST = HostInfo(
    cuda_compute_capabilities=("9.0",),
    runtimes={"onnxruntime": "1.20.0", "torch": f"{_TORCH}+cu128", "tensorrt": "10.3.0"},
    cpu_flags=AVX512_VNNI_FLAGS,
)


def _chosen(manifest: ModelManifest, host: HostInfo, prefer: list[str] = PREFER) -> str:
    return select_artifact(manifest, prefer, host).artifact.file


def test_the_default_order_is_gpu_first_then_onnxruntime_then_torch_on_cpu() -> None:
    assert PREFER == ["tensorrt", "torch:cuda", "onnxruntime", "torch"]


def test_a_cpu_host_runs_onnxruntime_and_says_why_not_the_gpu_artifacts() -> None:
    choice = select_artifact(FLEET, PREFER, CPU_HOST)
    assert choice.artifact.file == "model.ort.onnx"
    assert choice.executor.__name__ == "OnnxRuntimeExecutor"
    assert "TensorRT is not installed" in choice.skipped["tensorrt:model.sm90-trt10.3.0-fp16.plan"]
    assert "built without CUDA" in choice.skipped["torch:model.torch-cuda-fp16.pt2"]


def test_an_h100_runs_its_own_engine() -> None:
    choice = select_artifact(FLEET, PREFER, H100_HOST)
    assert choice.artifact.file == "model.sm90-trt10.3.0-fp16.plan"
    assert choice.executor.__name__ == "TensorRtExecutor"


def test_each_gpu_kind_of_a_fleet_gets_its_engine() -> None:
    a100 = HostInfo(
        cuda_compute_capabilities=("8.0",),
        runtimes={**H100_HOST.runtimes},
        cpu_flags=H100_HOST.cpu_flags,
    )
    choice = select_artifact(FLEET, PREFER, a100)
    assert choice.artifact.file == "model.sm80-trt10.3.0-fp16.plan"
    reason = choice.skipped["tensorrt:model.sm90-trt10.3.0-fp16.plan"]
    assert "compute capability 9.0" in reason and "8.0" in reason


def test_a_gpu_host_without_tensorrt_runs_the_torch_cuda_package() -> None:
    runtimes = {k: v for k, v in H100_HOST.runtimes.items() if k != "tensorrt"}
    host = HostInfo(cuda_compute_capabilities=("9.0",), runtimes=runtimes)
    assert _chosen(FLEET, host) == "model.torch-cuda-fp16.pt2"


def test_an_engine_from_another_tensorrt_release_is_passed_over() -> None:
    host = HostInfo(
        cuda_compute_capabilities=("9.0",),
        runtimes={**H100_HOST.runtimes, "tensorrt": "10.7.0"},
    )
    choice = select_artifact(FLEET, PREFER, host)
    assert choice.artifact.file == "model.torch-cuda-fp16.pt2"
    assert (
        "TensorRT 10.3.0; this host has TensorRT 10.7.0"
        in (choice.skipped["tensorrt:model.sm90-trt10.3.0-fp16.plan"])
    )


def test_prefer_can_put_torch_on_the_cpu_first() -> None:
    assert _chosen(FLEET, CPU_HOST, ["torch", "onnxruntime"]) == "model.torch-cpu-fp32.pt2"
    assert _chosen(FLEET, CPU_HOST, ["torch:cpu", "onnxruntime"]) == "model.torch-cpu-fp32.pt2"


def test_a_qualified_entry_ranks_only_its_device() -> None:
    # "torch:cuda" first does not lift the CPU package above onnxruntime.
    assert _chosen(FLEET, CPU_HOST, ["torch:cuda", "onnxruntime", "torch"]) == "model.ort.onnx"


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        (HostInfo(runtimes={"torch": "2.12.1+cpu"}), "built with torch 2.13.0"),
        (HostInfo(runtimes={"torch": f"{_TORCH}+cpu"}, cpu_flags=frozenset({"sse4_2"})), "avx2"),
        (HostInfo(runtimes={}), "torch is not installed"),
    ],
)
def test_a_cpu_package_needs_its_torch_release_and_cpu(host: HostInfo, reason: str) -> None:
    only_torch = FLEET.model_copy(update={"artifacts": [FLEET.artifacts[1]]})
    with pytest.raises(NoFittingArtifact, match=reason):
        select_artifact(only_torch, PREFER, host)


def _cpu_package(*, fallback: bool = False, **options: Any) -> ModelManifest:
    """FLEET with only a CPU torch package carrying ``options`` (and onnxruntime if fallback)."""
    artifact = _artifact(
        "torch", "model.torch-cpu-fp32.pt2", device="cpu", torch_version=_TORCH, **options
    )
    others = [FLEET.artifacts[0]] if fallback else []
    return FLEET.model_copy(update={"artifacts": [*others, artifact]})


_VNNI_BUILD: dict[str, Any] = {
    "cpu_isa": "avx512 avx512_vnni",
    "cpu_flags": ["avx512_vnni", "avx512bw", "avx512dq", "avx512f", "avx512vl", "fma"],
}


def test_a_package_built_on_an_avx512_vnni_host_runs_on_one() -> None:
    vnni_host = HostInfo(runtimes=CPU_HOST.runtimes, cpu_flags=AVX512_VNNI_FLAGS)
    assert _chosen(_cpu_package(**_VNNI_BUILD), vnni_host, ["torch", "onnxruntime"]) == (
        "model.torch-cpu-fp32.pt2"
    )


def test_an_avx2_host_passes_over_an_avx512_vnni_package_naming_the_missing_flags() -> None:
    choice = select_artifact(
        _cpu_package(fallback=True, **_VNNI_BUILD), ["torch", "onnxruntime"], CPU_HOST
    )
    assert choice.artifact.file == "model.ort.onnx"
    reason = choice.skipped["torch:model.torch-cpu-fp32.pt2"]
    assert reason == (
        "built for CPUs with avx512_vnni, avx512bw, avx512dq, avx512f, avx512vl; "
        "this host's CPU lacks them"
    )


@pytest.mark.parametrize(
    ("isa", "missing"),
    [
        ("avx512 avx512_vnni", "avx512_vnni"),
        ("avx512", "avx512f"),
        ("avx512 avx512_vnni amx_tile", "amx_tile"),
    ],
)
def test_an_old_manifest_s_isa_name_still_keeps_its_package_off_an_avx2_host(
    isa: str, missing: str
) -> None:
    with pytest.raises(NoFittingArtifact, match=f"built for CPUs with .*{missing}"):
        select_artifact(_cpu_package(cpu_isa=isa), ["torch"], CPU_HOST)
    amx_host = HostInfo(
        runtimes=CPU_HOST.runtimes,
        cpu_flags=AVX512_VNNI_FLAGS | {"amx_tile", "amx_bf16", "amx_int8"},
    )
    assert _chosen(_cpu_package(cpu_isa=isa), amx_host, ["torch"]) == "model.torch-cpu-fp32.pt2"


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"cpu_isa": "avx10"}, "unknown CPU instruction set (cpu_isa 'avx10')"),
        ({"cpu_isa": ""}, "unknown CPU instruction set (cpu_isa '')"),
        ({}, "unknown CPU instruction set (cpu_isa None)"),
        ({"cpu_flags": "avx2"}, "cpu_flags 'avx2' are not a list"),
    ],
)
def test_a_package_whose_cpu_needs_are_unknown_is_refused(
    options: dict[str, Any], reason: str
) -> None:
    rich_host = HostInfo(runtimes=CPU_HOST.runtimes, cpu_flags=AVX512_VNNI_FLAGS)
    with pytest.raises(NoFittingArtifact, match=re.escape(reason)):
        select_artifact(_cpu_package(**options), ["torch"], rich_host)


def test_a_host_whose_cpu_flags_are_unknown_runs_no_package_that_needs_some() -> None:
    unknown = HostInfo(runtimes=CPU_HOST.runtimes)
    choice = select_artifact(
        _cpu_package(fallback=True, **_VNNI_BUILD), ["torch", "onnxruntime"], unknown
    )
    assert choice.artifact.file == "model.ort.onnx"
    assert "this host's CPU flags are unknown" in choice.skipped["torch:model.torch-cpu-fp32.pt2"]
    # A package built without vector instructions needs nothing of the CPU.
    plain = _cpu_package(cpu_isa="invalid_vec_isa", cpu_flags=[])
    assert _chosen(plain, unknown, ["torch"]) == "model.torch-cpu-fp32.pt2"


def test_no_fitting_artifact_says_why_for_each() -> None:
    gpu_only = FLEET.model_copy(update={"artifacts": FLEET.artifacts[2:]})
    with pytest.raises(NoFittingArtifact) as raised:
        select_artifact(gpu_only, PREFER, CPU_HOST)
    message = str(raised.value)
    assert message.startswith("no artifact of digits version 1 fits this host")
    for artifact in gpu_only.artifacts:
        assert f"{artifact.target}:{artifact.file}" in message


def test_selection_imports_neither_torch_nor_tensorrt() -> None:
    # A fresh interpreter: this one may have torch from other tests.
    code = (
        "import sys\n"
        "from tests.serving.inference.test_host_selection import (\n"
        "    CPU_HOST, FLEET, H100_HOST, PREFER)\n"
        "from serving.inference.replica import select_artifact\n"
        "for host in (H100_HOST, CPU_HOST):\n"
        "    print(select_artifact(FLEET, PREFER, host).artifact.file)\n"
        "print(sorted(m for m in ('torch', 'tensorrt') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert done.stdout.split() == ["model.sm90-trt10.3.0-fp16.plan", "model.ort.onnx", "[]"]


def test_this_host_is_described_from_metadata_and_proc() -> None:
    host = detect_host()
    assert host.runtimes["onnxruntime"] == md.version("onnxruntime")
    assert host.runtimes.get("torch") == md.version("torch")
    if sys.platform == "linux":
        assert host.cpu_flags, "a Linux host lists its CPU flags in /proc/cpuinfo"
    assert all(cc.replace(".", "").isdigit() for cc in host.cuda_compute_capabilities)


@pytest.mark.parametrize(
    ("version", "cuda"),
    [("2.13.0+cpu", False), ("2.13.0+cu128", True), ("2.13.0", True), (None, False)],
)
def test_torch_builds_with_cuda_are_told_by_their_version(version: str | None, cuda: bool) -> None:
    assert torch_has_cuda(version) is cuda
