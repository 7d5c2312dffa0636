"""The torch target: torch.export + AOTInductor packages, parity, and what it refuses."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from compilers.errors import BuildError
from compilers.pipeline import build_model
from compilers.signature import ModelSignature
from compilers.targets import BuildSource, get_target
from compilers.targets.torch import TorchTarget, artifact_file, required_cpu_flags
from compilers.validate import TOLERANCES
from model_store.manifest import TensorSpec
from model_store.store import ModelStore
from serving.inference.executors.torch import TorchExecutor
from serving.inference.hosts import detect_host
from tests.helpers.tiny_models import tiny_mlp, write_matmul_onnx
from tests.helpers.torch_store import TorchStore, torch_store

_MLP_SIGNATURE = ModelSignature(
    inputs=(TensorSpec(name="x", datatype="FP32", shape=[-1, 4]),),
    outputs=(TensorSpec(name="y", datatype="FP32", shape=[-1, 3]),),
)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> TorchStore:
    return torch_store(tmp_path_factory)


def test_the_torch_target_is_in_the_table() -> None:
    assert isinstance(get_target("torch"), TorchTarget)


def test_a_cpu_package_records_what_a_host_needs(built: TorchStore) -> None:
    artifact = built.manifest.artifact("torch")
    assert artifact is not None
    assert artifact.file == artifact_file("cpu", "fp32")
    assert artifact.options["device"] == "cpu"
    assert artifact.options["precision"] == "fp32"
    assert artifact.options["torch_version"] == torch.__version__
    flags = artifact.options["cpu_flags"]
    assert isinstance(flags, list) and all(isinstance(f, str) for f in flags)
    # What the package needs, this host has (as /proc/cpuinfo names it): the host that
    # built it would serve it.
    host = detect_host()
    if host.cpu_flags:
        assert set(flags) <= host.cpu_flags
        assert TorchExecutor.unfit_reason(artifact, host) is None
    parity = artifact.parity
    assert parity is not None and parity.samples == 64
    assert parity.max_abs_err <= TOLERANCES["fp32"].atol
    assert parity.top1_agreement == 1.0


@pytest.mark.parametrize(
    ("isa", "arch_flags", "needed"),
    [
        ("avx2", "-mavx2 -mfma -mf16c", ["avx2", "f16c", "fma"]),
        (
            "avx512 avx512_vnni",
            "-mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma -mavx512vnni -mavx512vl",
            ["avx512_vnni", "avx512bw", "avx512dq", "avx512f", "avx512vl", "fma"],
        ),
        (
            "avx512 avx512_vnni amx_tile",
            "-mavx512f -mfma -mavx512vnni -mamx-tile -mamx-bf16 -mamx-int8 -mavx512bf16",
            ["amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "fma"],
        ),
        ("asimd", "", ["asimd"]),
        ("asimd", "-march=armv8-a+sve+bf16 -msve-vector-bits=256", ["asimd", "bf16", "sve"]),
        ("invalid_vec_isa", "", []),
    ],
)
def test_the_cpu_flags_a_package_needs_are_named_as_proc_cpuinfo_names_them(
    isa: str, arch_flags: str, needed: list[str]
) -> None:
    assert required_cpu_flags(isa, arch_flags) == needed


def test_the_package_runs_any_batch_size_like_the_module(built: TorchStore) -> None:
    artifact = built.manifest.artifact("torch")
    assert artifact is not None
    path = built.store.artifact_path(built.manifest, artifact)
    run = TorchTarget().load(path)
    for rows in (1, 3, 64):
        images = built.images[:rows]
        with torch.no_grad():
            expected = built.module(torch.from_numpy(images)).numpy()
        got = run({"input": images})["logits"]
        assert got.shape == (rows, 10)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_an_onnx_file_cannot_be_built_for_torch(store: ModelStore, tmp_path: Path) -> None:
    onnx_path = tmp_path / "matmul.onnx"
    write_matmul_onnx(onnx_path)
    with pytest.raises(BuildError, match="--module"):
        build_model(store, "matmul", onnx_path=onnx_path, targets=["torch"])
    assert store.models() == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"precision": "fp16"}, "needs device cuda"),
        ({"device": "tpu"}, "use one of cpu, cuda"),
        ({"precision": "fp8"}, "use one of fp32, fp16, bf16"),
        ({"workspace": 1}, "unknown torch target options"),
    ],
)
def test_bad_options_are_refused_before_compiling(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    source = BuildSource(tmp_path / "unused.onnx", _MLP_SIGNATURE, 8, module=tiny_mlp())
    with pytest.raises(BuildError, match=message):
        TorchTarget().build(source, tmp_path / "out", options)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU that torch can use")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_a_cuda_package_matches_the_module(store: ModelStore, precision: str) -> None:
    manifest = build_model(
        store,
        f"mlp-{precision}",
        module=tiny_mlp(),
        inputs=list(_MLP_SIGNATURE.inputs),
        output_names=["y"],
        targets=["torch"],
        target_options={"torch": {"device": "cuda", "precision": precision}},
        max_batch_size=16,
    )
    artifact = manifest.artifacts[0]
    major, minor = torch.cuda.get_device_capability()
    assert artifact.options["compute_capability"] == f"{major}.{minor}"
    assert artifact.options["precision"] == precision
    assert artifact.parity is not None
    assert artifact.parity.max_abs_err <= TOLERANCES[precision].atol + 1e-6


def test_build_options_are_read_per_target() -> None:
    from compilers.cli import parse_target_option

    assert parse_target_option("torch.device=cuda") == ("torch", "device", "cuda")
    assert parse_target_option("tensorrt.workspace_mb=512") == ("tensorrt", "workspace_mb", 512)
    assert parse_target_option("torch.max_autotune=true") == ("torch", "max_autotune", True)
    with pytest.raises(argparse.ArgumentTypeError, match=r"TARGET\.KEY=VALUE"):
        parse_target_option("precision=fp16")
