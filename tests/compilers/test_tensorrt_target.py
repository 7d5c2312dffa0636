"""The TensorRT target: cache keys and profiles here; engines where TensorRT and a GPU exist."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest

from compilers.errors import BuildError
from compilers.pipeline import build_model
from compilers.signature import ModelSignature
from compilers.targets import BuildSource, get_target
from compilers.targets.tensorrt import (
    TensorRtTarget,
    context_count,
    engine_cache_key,
    engine_file,
    optimisation_profile,
)
from compilers.validate import TOLERANCES
from model_store.manifest import TensorSpec
from model_store.store import ModelStore
from tests.helpers.tiny_models import tiny_mlp


def _gpu_skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'fermion[tensorrt]' from pypi.nvidia.com)"
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU that torch {torch.__version__} can use"
    return None


_SKIP = _gpu_skip_reason()
needs_tensorrt_gpu = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
_INPUTS = [TensorSpec(name="x", datatype="FP32", shape=[-1, 4])]


def test_the_tensorrt_target_is_in_the_table() -> None:
    assert isinstance(get_target("tensorrt"), TensorRtTarget)


def test_the_cache_key_names_gpu_kind_tensorrt_release_and_precision() -> None:
    key = engine_cache_key("9.0", "10.3.0", "fp16")
    assert key == "sm90-trt10.3.0-fp16"
    assert engine_file(key) == "model.sm90-trt10.3.0-fp16.plan"
    keys = {
        engine_cache_key(cc, trt, p)
        for cc in ("8.0", "8.6", "9.0")
        for trt in ("10.3.0", "10.7.0")
        for p in ("fp32", "fp16", "int8")
    }
    assert len(keys) == 18, "every GPU kind, release and precision gets an engine of its own"


def test_an_unknown_precision_has_no_key() -> None:
    with pytest.raises(BuildError, match="use one of fp32, tf32, fp16, int8"):
        engine_cache_key("9.0", "10.3.0", "fp8")


@pytest.mark.parametrize(
    ("max_batch", "opt", "profile"),
    [(64, None, (1, 64, 64)), (64, 8, (1, 8, 64)), (0, None, (1, 1, 1)), (1, None, (1, 1, 1))],
)
def test_the_profile_spans_one_row_to_the_max_batch(
    max_batch: int, opt: int | None, profile: tuple[int, int, int]
) -> None:
    assert optimisation_profile(max_batch, opt) == profile


def test_an_opt_batch_outside_the_profile_is_refused() -> None:
    with pytest.raises(BuildError, match="opt_batch_size 65"):
        optimisation_profile(64, 65)


@pytest.mark.parametrize(("value", "count"), [(None, 2), (1, 1), (16, 16)])
def test_an_engine_gets_one_profile_per_concurrent_context(value: int | None, count: int) -> None:
    assert context_count(value) == count


@pytest.mark.parametrize("value", [0, 17, -1, 2.5, "4", True])
def test_a_context_count_outside_one_to_sixteen_is_refused(value: object) -> None:
    with pytest.raises(BuildError, match=r"contexts must be an integer in \[1, 16\]"):
        context_count(value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"precision": "fp8"}, "use one of fp32"),
        ({"contexts": 0}, "contexts must be"),
        ({"opt_batch_size": 99}, "opt_batch_size 99"),
    ],
)
def test_bad_options_are_refused_on_any_host_before_tensorrt_is_imported(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    signature = ModelSignature(inputs=tuple(_INPUTS), outputs=(_INPUTS[0],))
    source = BuildSource(tmp_path / "model.onnx", signature, 16, module=tiny_mlp())
    with pytest.raises(BuildError, match=message):
        TensorRtTarget().build(source, tmp_path / "out", options)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(_SKIP is None, reason="tensorrt and a GPU are here: the real build runs")
def test_without_tensorrt_and_a_gpu_the_build_says_what_is_missing(tmp_path: Path) -> None:
    signature = ModelSignature(inputs=tuple(_INPUTS), outputs=(_INPUTS[0],))
    source = BuildSource(tmp_path / "model.onnx", signature, 16, module=tiny_mlp())
    with pytest.raises(BuildError, match="tensorrt") as raised:
        TensorRtTarget().build(source, tmp_path / "out", {"precision": "fp16"})
    assert "pypi.nvidia.com" in str(raised.value) or "GPU" in str(raised.value)
    assert not (tmp_path / "out").exists()


@needs_tensorrt_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_an_engine_matches_the_module_and_is_built_once_per_key(
    tmp_path: Path, precision: str
) -> None:
    store = ModelStore(tmp_path / "store")
    options = {"tensorrt": {"precision": precision, "cache_dir": str(tmp_path / "cache")}}
    first, second = (
        build_model(
            store,
            "mlp",
            module=tiny_mlp(),
            inputs=_INPUTS,
            output_names=["y"],
            targets=["tensorrt"],
            target_options=options,
            max_batch_size=16,
        ).artifacts[0]
        for _ in range(2)
    )
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    assert first.options["cache_key"] == engine_cache_key(
        f"{major}.{minor}", trt.__version__, precision
    )
    assert first.options["profile"] == {"min": 1, "opt": 16, "max": 16}
    assert first.options["contexts"] == 2
    assert (first.options["engine_reused"], second.options["engine_reused"]) == (False, True)
    assert first.sha256 == second.sha256
    assert first.parity is not None and first.parity.max_abs_err <= TOLERANCES[precision].atol
    assert any((tmp_path / "cache").glob("timing-*.cache"))


@needs_tensorrt_gpu
def test_the_executor_runs_concurrent_batches_of_any_size(tmp_path: Path) -> None:
    import torch

    from serving.inference.executors import ExecutorOptions
    from serving.inference.executors.tensorrt import TensorRtExecutor

    store = ModelStore(tmp_path / "store")
    module = tiny_mlp()
    manifest = build_model(
        store,
        "mlp",
        module=module,
        inputs=_INPUTS,
        output_names=["y"],
        targets=["tensorrt"],
        target_options={"tensorrt": {"precision": "fp32", "cache_dir": str(tmp_path / "c")}},
        max_batch_size=16,
    )
    artifact = manifest.artifacts[0]
    executor = TensorRtExecutor(
        store.artifact_path(manifest, artifact), manifest, artifact, ExecutorOptions()
    )
    rng = np.random.default_rng(0)
    errors: list[BaseException] = []

    def check(rows: int) -> None:
        try:
            x = rng.random((rows, 4), dtype=np.float32)
            with torch.no_grad():
                expected = module(torch.from_numpy(x)).numpy()
            got = executor.run({"x": x})["y"]
            np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
        except BaseException as exc:
            errors.append(exc)

    assert executor.describe()["contexts"] == 2, "one context per profile the engine has"
    # More concurrent batches than profiles: the extra ones wait for a context.
    threads = [threading.Thread(target=check, args=(rows,)) for rows in (1, 5, 16, 3, 16, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
