"""Fermion (backend remote) in front of KServe's own Python V2 server.

KServe runs in a virtual environment of its own (kserve==0.21.0, made once under
``.bench-venvs/kserve`` by ``bench/competitors.py``, some 40 s from the package
registry); the test is skipped, saying why, only when that environment cannot be made.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bench.competitors import competitor_python
from tests.helpers.remote_models import expected
from tests.helpers.servers import REPO_ROOT, RunningServer, free_port, start_server, stop_server

# The first test also waits for KServe's environment to be made (a minute or more on a
# busy 2-core host, from the package registry).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def kserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        python = competitor_python("kserve")
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot make KServe's virtual environment (kserve==0.21.0): {e}")
    port = free_port()
    log = tmp_path_factory.mktemp("kserve") / "kserve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(python),
                str(REPO_ROOT / "tests" / "helpers" / "kserve_linear.py"),
                "--port",
                str(port),
                "--grpc-port",
                str(free_port()),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"KServe exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"KServe not ready after 60 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def edge(kserve: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("edge")
    # KServe serves unversioned paths only; it has no /config, so the batch size is given.
    config = f"""
backend: remote
remote:
  urls: [{kserve}]
  version: ""
  max_batch_size: 16
models:
  linear: {{}}
"""
    running = start_server(tmp / "empty-store", tmp, config)
    yield running
    stop_server(running)


def _body(x: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ]
    }


def test_the_metadata_comes_from_kserve(kserve: str, edge: RunningServer) -> None:
    theirs = httpx.get(f"{kserve}/v2/models/linear").json()
    ours = httpx.get(f"{edge.url}/v2/models/linear").json()
    assert (
        ours["inputs"] == theirs["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    )
    assert ours["outputs"] == theirs["outputs"]
    assert ours["versions"] == ["1"]
    assert httpx.get(f"{edge.url}/v2/models/linear/config").json()["max_batch_size"] == 16


async def test_predictions_equal_kserve_s_own(kserve: str, edge: RunningServer) -> None:
    rng = np.random.default_rng(7)
    xs = [rng.random((rows, 4), dtype=np.float32) for rows in (1, 3, 1, 2, 5, 1)]
    async with httpx.AsyncClient(timeout=30) as client:
        # At once, so that the edge batches them into fewer KServe requests.
        answers = await asyncio.gather(
            *(client.post(f"{edge.url}/v2/models/linear/infer", json=_body(x)) for x in xs)
        )
        for x, answer in zip(xs, answers, strict=True):
            assert answer.status_code == 200, answer.text
            assert answer.headers["fermion-location"] == "remote"
            direct = await client.post(f"{kserve}/v2/models/linear/infer", json=_body(x))
            ours, theirs = answer.json()["outputs"][0], direct.json()["outputs"][0]
            assert ours["shape"] == theirs["shape"] == [len(x), 3]
            # KServe's own numbers, to the last bit or two: the edge sent rows of several
            # requests in one batch, where numpy may sum in another order.
            np.testing.assert_allclose(ours["data"], theirs["data"], rtol=1e-6)
            np.testing.assert_allclose(ours["data"], expected(x).ravel(), rtol=1e-6)


@pytest.mark.parametrize(
    ("row", "status", "message"),
    [
        ([1.0, 2.0, -3.0, 4.0], 400, "x must not be negative"),
        ([999.0] * 4, 500, "the model cannot compute a row of 999s"),
    ],
)
async def test_kserve_s_errors_keep_their_status_and_fail_only_their_request(
    kserve: str, edge: RunningServer, row: list[float], status: int, message: str
) -> None:
    bad = np.array([row], dtype=np.float32)
    direct = httpx.post(f"{kserve}/v2/models/linear/infer", json=_body(bad))
    assert direct.status_code == status
    good = np.ones((1, 4), dtype=np.float32)
    async with httpx.AsyncClient(timeout=30) as client:
        answers = await asyncio.gather(
            *(
                client.post(f"{edge.url}/v2/models/linear/infer", json=_body(x))
                for x in (good, bad, good, good)
            )
        )
    assert answers[1].status_code == status
    assert message in answers[1].json()["error"]
    if status == 400:  # a refused value fails only its own request
        assert [a.status_code for a in answers] == [200, 400, 200, 200]


def test_an_unknown_upstream_model_fails_its_load_with_kserve_s_reason(
    kserve: str, tmp_path: Path
) -> None:
    config = f"""
backend: remote
remote:
  urls: [{kserve}]
  version: ""
  load_timeout_s: 1
models:
  linear: {{remote: {{model: resnet}}}}
"""
    edge = start_server(tmp_path / "empty-store", tmp_path, config, ready_path="/v2/health/live")
    try:
        deadline = time.monotonic() + 30
        while "model linear failed to load" not in edge.log():
            assert time.monotonic() < deadline, edge.log()
            time.sleep(0.1)
        assert "upstream answered 404" in edge.log()
        assert httpx.get(f"{edge.url}/v2/models/linear").status_code == 404
    finally:
        stop_server(edge)
