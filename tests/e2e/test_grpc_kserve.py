"""KServe's V2 gRPC clients work unchanged: stubs generated from KServe's own proto.

The ``kserve`` package itself is not installed for the tests: it pins protobuf below 7
and brings a Kubernetes client, FastAPI and pandas. Its ``InferenceGRPCClient`` speaks
through stubs generated from the same ``grpc_predict_v2.proto`` that this test compiles.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.helpers.servers import REPO_ROOT, RunningServer

pytestmark = pytest.mark.e2e


def test_kserve_stubs_speak_to_the_gateway(grpc_server: RunningServer) -> None:
    assert grpc_server.grpc_address is not None
    done = subprocess.run(
        [sys.executable, "-m", "tests.e2e.kserve_proto.kserve_client", grpc_server.grpc_address],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert (got["live"], got["ready"], got["model_ready"]) == (True, True, True)
    assert got["missing_model"] == "NOT_FOUND"
    assert got["server"] == "fermion"
    assert got["versions"] == ["1", "2"]
    assert got["inputs"] == [["input", "FP32", [-1, 1, 28, 28]]]
    assert (got["id"], got["model_version"]) == ("k-1", "2")
    assert got["outputs"] == [["logits", "FP32", [2, 10]]]
    body = {"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32"}]}
    body["inputs"][0]["data"] = got["input"]
    http = httpx.post(f"{grpc_server.url}/v2/models/digits/infer", json=body, timeout=30)
    expected = np.asarray(http.json()["outputs"][0]["data"], np.float32)
    np.testing.assert_allclose(got["raw_logits"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["typed_logits"], expected, rtol=1e-6, atol=1e-6)
