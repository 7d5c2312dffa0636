"""The torch target end to end: a CPU package served, equal to the ONNX artifact's answers.

Also: a server whose chosen artifact is ONNX Runtime never loads torch or onnx, and a model
whose artifacts fit no host stays unavailable, with the reason in its config.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers.servers import RunningServer, start_server, stop_server
from tests.helpers.torch_store import GPU_ONLY, MODEL, TorchStore, torch_store

pytestmark = pytest.mark.e2e

_ROWS = 16


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> TorchStore:
    return torch_store(tmp_path_factory)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torch-e2e")


def _start_serving(root: Path, tmp: Path, config: str, wait_for: str) -> RunningServer:
    """Start ``fermion serve`` and wait for ``wait_for`` to answer 200 (not the whole server)."""
    return start_server(root, tmp, config, ready_path=wait_for)


@pytest.fixture(scope="module")
def ort_server(built: TorchStore, work: Path) -> Iterator[RunningServer]:
    """Default preferences: ONNX Runtime for digits; digits-gpu fits nothing here."""
    server = _start_serving(built.store.root, work, "", f"/v2/models/{MODEL}/ready")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def torch_server(built: TorchStore, work: Path) -> Iterator[RunningServer]:
    config = f"executor:\n  prefer: [torch, onnxruntime]\nmodels:\n  {MODEL}: {{}}\n"
    server = start_server(built.store.root, work, config)
    yield server
    stop_server(server)


def _config(server: RunningServer, model: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v2/models/{model}/config", timeout=10)
    assert response.status_code == 200
    config: dict[str, Any] = response.json()
    return config


def _logits(server: RunningServer, images: np.ndarray) -> np.ndarray:
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(images.shape),
                "datatype": "FP32",
                "data": images.ravel().tolist(),
            }
        ]
    }
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    assert out["name"] == "logits" and out["shape"] == [len(images), 10]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _maps(server: RunningServer) -> str:
    return Path(f"/proc/{server.process.pid}/maps").read_text()


def _package_dir(name: str) -> str:
    """Where package ``name`` is installed, with a trailing slash (``.../site-packages/torch/``).

    A bare ``/torch/`` is no marker: the environment's own path can hold it (a virtual
    environment under ``/opt/torch/``, say), so the tests look for the package's folder.
    """
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, name
    return str(Path(next(iter(spec.submodule_search_locations))).resolve()) + "/"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_prefer_torch_serves_the_package(torch_server: RunningServer) -> None:
    artifact = _config(torch_server, MODEL)["artifact"]
    assert artifact["target"] == "torch"
    assert artifact["executor"] == "TorchExecutor"
    assert artifact["options"]["device"] == "cpu"
    assert artifact["runtime"] == {"device": "cpu", "cuda_graphs": []}
    maps = _maps(torch_server)
    assert "libtorch" in maps and _package_dir("torch") in maps  # what the other test looks for


def test_torch_and_onnx_artifacts_answer_alike(
    built: TorchStore, torch_server: RunningServer, ort_server: RunningServer
) -> None:
    images = built.images[:_ROWS]
    from_torch = _logits(torch_server, images)
    from_onnx = _logits(ort_server, images)
    np.testing.assert_allclose(from_torch, from_onnx, atol=1e-4, rtol=1e-3)
    assert (from_torch.argmax(axis=1) == from_onnx.argmax(axis=1)).all()
    one = _logits(torch_server, images[:1])
    np.testing.assert_allclose(one, from_onnx[:1], atol=1e-4, rtol=1e-3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_serving_the_onnx_artifact_never_loads_torch(ort_server: RunningServer) -> None:
    artifact = _config(ort_server, MODEL)["artifact"]
    assert artifact["target"] == "onnxruntime"
    maps = _maps(ort_server)
    assert "onnxruntime" in maps
    # Neither torch (its libraries, or any file of its package: importing torch loads
    # torch/_C) nor the onnx package (whose import loads its onnx_cpp2py_export extension).
    torch_dir, onnx_dir = _package_dir("torch"), _package_dir("onnx")
    for loaded_by_an_import in ("libtorch", "libc10", torch_dir, "onnx_cpp2py_export", onnx_dir):
        assert loaded_by_an_import not in maps, loaded_by_an_import


def test_a_model_that_fits_no_host_is_never_ready(ort_server: RunningServer) -> None:
    config = _config(ort_server, GPU_ONLY)
    assert config["state"] == "UNAVAILABLE"
    reason = config["reason"]
    assert reason.startswith(f"no artifact of {GPU_ONLY} version 1 fits this host")
    assert "tensorrt:model.sm10-trt10.0.0-fp16.plan" in reason
    assert "torch:model.torch-cuda-fp16.pt2" in reason
    ready = httpx.get(f"{ort_server.url}/v2/models/{GPU_ONLY}/ready", timeout=10)
    assert ready.status_code == 503
    assert httpx.get(f"{ort_server.url}/v2/health/ready", timeout=10).status_code == 503


def test_metrics_say_which_artifact_each_version_runs(
    ort_server: RunningServer, torch_server: RunningServer
) -> None:
    for server, target in ((ort_server, "onnxruntime"), (torch_server, "torch")):
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        line = (
            f'fermion_model_artifact{{device="cpu",model="{MODEL}",target="{target}",version="1"}}'
        )
        assert f"{line} 1.0" in text
    assert (
        f'model="{GPU_ONLY}"'
        not in httpx.get(f"{ort_server.url}/metrics", timeout=10)
        .text.split("fermion_model_artifact", 1)[1]
        .split("# HELP", 1)[0]
    )
