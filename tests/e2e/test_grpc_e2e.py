"""The V2 gRPC transport of the real gateway, through tritonclient.grpc (sync and aio):
health, metadata, config, statistics, the repository, inference equal to HTTP's, and the
RPCs Fermion does not offer."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from model_store.store import ModelStore
from tests.e2e.conftest import MAX_BODY_BYTES
from tests.helpers.servers import REPO_ROOT, RunningServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def served(grpc_server: RunningServer) -> RunningServer:
    return grpc_server


@pytest.fixture(scope="module")
def client(served: RunningServer) -> Iterator[grpcclient.InferenceServerClient]:
    assert served.grpc_address is not None
    c = grpcclient.InferenceServerClient(served.grpc_address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def samples(demo_store: ModelStore) -> np.ndarray:
    manifest = demo_store.manifest("digits", 2)
    entry = next(f for f in manifest.files if f.file == "samples.npz")
    with np.load(demo_store.artifact_path(manifest, entry)) as npz:
        x: np.ndarray = npz["input"][:8].astype(np.float32)
        return x


def _input(x: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def _http_logits(served: RunningServer, x: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32"}]}
    body["inputs"][0]["data"] = x.ravel().tolist()
    r = httpx.post(f"{served.url}/v2/models/digits/versions/2/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def test_health_and_metadata_as_over_http(
    served: RunningServer, client: grpcclient.InferenceServerClient
) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "fermion"
    assert set(server["extensions"]) >= {"binary_tensor_data", "model_repository"}
    grpc_meta = client.get_model_metadata("digits", as_json=True)
    http_meta = httpx.get(f"{served.url}/v2/models/digits").json()
    assert grpc_meta["versions"] == http_meta["versions"] == ["1", "2"]
    for key in ("inputs", "outputs"):
        assert [
            {"name": t["name"], "datatype": t["datatype"], "shape": [int(d) for d in t["shape"]]}
            for t in grpc_meta[key]
        ] == http_meta[key]
    config = client.get_model_config("digits", as_json=True)["config"]
    assert config["max_batch_size"] == 64
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert [int(d) for d in config["input"][0]["dims"]] == [1, 28, 28]
    assert config["backend"] == "local"


def test_infer_with_raw_contents_equals_http(
    served: RunningServer, client: grpcclient.InferenceServerClient, samples: np.ndarray
) -> None:
    result = client.infer(
        "digits",
        [_input(samples)],
        model_version="2",
        request_id="req-7",
        outputs=[grpcclient.InferRequestedOutput("logits")],
    )
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("req-7", "digits", "2")
    logits = result.as_numpy("logits")
    assert logits.shape == (8, 10)
    np.testing.assert_allclose(logits, _http_logits(served, samples), rtol=1e-6, atol=1e-6)
    # No output named: every output, as over HTTP.
    assert client.infer("digits", [_input(samples[:1])]).as_numpy("logits").shape == (1, 10)


def test_typed_contents_answer_as_raw_contents(served: RunningServer, samples: np.ndarray) -> None:
    assert served.grpc_address is not None
    with grpc.insecure_channel(served.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        tensor = pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=[2, 1, 28, 28]
        )
        tensor.contents.fp32_contents.extend(samples[:2].ravel().tolist())
        response = stub.ModelInfer(pb.ModelInferRequest(model_name="digits", inputs=[tensor]))
    logits = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 10)
    np.testing.assert_allclose(logits, _http_logits(served, samples[:2]), rtol=1e-6, atol=1e-6)


async def test_aio_client_concurrent_calls(served: RunningServer, samples: np.ndarray) -> None:
    assert served.grpc_address is not None
    expected = _http_logits(served, samples)
    async with grpcaio.InferenceServerClient(served.grpc_address) as client:
        assert await client.is_server_ready()
        results = await asyncio.gather(
            *(client.infer("digits", [_input(samples[i : i + 1])]) for i in range(8))
        )
    got = np.concatenate([r.as_numpy("logits") for r in results])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_statistics_and_repository(client: grpcclient.InferenceServerClient) -> None:
    before = client.get_inference_statistics("digits", "2", as_json=True)["model_stats"][0]
    client.infer("digits", [_input(np.zeros((3, 1, 28, 28), np.float32))], model_version="2")
    after = client.get_inference_statistics("digits", "2", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 3
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {"name": "digits", "version": "2", "state": "READY"} in index
    client.unload_model("digits")
    with pytest.raises(InferenceServerException) as raised:
        client.infer("digits", [_input(np.zeros((1, 1, 28, 28), np.float32))])
    assert raised.value.status() == "StatusCode.NOT_FOUND"
    client.load_model("digits")
    assert client.is_model_ready("digits")


def test_rpcs_not_offered_are_unimplemented_with_a_reason(
    client: grpcclient.InferenceServerClient,
) -> None:
    for call in (
        client.get_system_shared_memory_status,
        client.get_cuda_shared_memory_status,
        client.get_trace_settings,
        client.get_log_settings,
    ):
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert raised.value.status() == "StatusCode.UNIMPLEMENTED"
        assert "Fermion does not offer" in (raised.value.message() or "")


def test_a_message_over_the_body_limit_is_resource_exhausted(
    client: grpcclient.InferenceServerClient,
) -> None:
    rows = MAX_BODY_BYTES // 3136 + 1
    with pytest.raises(InferenceServerException) as raised:
        client.infer("digits", [_input(np.zeros((rows, 1, 28, 28), np.float32))])
    assert raised.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert client.is_server_ready()


def test_the_readme_example_works_as_printed(
    served: RunningServer, demo_store: ModelStore, tmp_path: Path
) -> None:
    """The README's tritonclient.grpc example, with this server's address and store."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("\n## gRPC\n") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    assert served.grpc_address is not None
    script = code.group(1).replace("127.0.0.1:8001", served.grpc_address)
    (tmp_path / "model_store").symlink_to(demo_store.root)
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert re.fullmatch(r"\[\d \d\] from version 2\n", run.stdout), run.stdout
