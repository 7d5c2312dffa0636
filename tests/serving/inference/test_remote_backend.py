"""Backend remote against real Fermion upstreams served by uvicorn on loopback, in process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model_store.store import ModelStore
from serving.config import FermionConfig
from serving.http.app import create_app
from tests.helpers.inprocess import InProcessGateway, serve_in_process, wait_ready
from tests.helpers.loopback import LoopbackServer, serve_on_loopback
from tests.helpers.prom import metric_value
from tests.helpers.remote_models import expected, publish_linear

FAST_HEALTH = {"interval_s": 0.2, "timeout_s": 1.0, "open_s": 0.5}


@pytest.fixture(scope="module")
def cloud_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    tmp = tmp_path_factory.mktemp("cloud")
    store = ModelStore(tmp / "store")
    publish_linear(store, tmp / "work")
    return store


def _body(x: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ]
    }


def _answer(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


@asynccontextmanager
async def _cloud(store: ModelStore, **config: Any) -> AsyncIterator[LoopbackServer]:
    """A Fermion upstream on loopback, yielded once it is ready.

    Uvicorn listens before the app's models have loaded; an edge started then would
    find this upstream not ready and, with slow health checks, leave it out.
    """
    app = create_app(FermionConfig.model_validate(config), store=store)
    async with serve_on_loopback(app) as server, httpx.AsyncClient() as client:
        await wait_ready(client, server.url + "/v2/health/ready", f"the upstream at {server.url}")
        yield server


@asynccontextmanager
async def _edge(
    tmp: Path, urls: list[str], store: ModelStore | None = None, **remote: Any
) -> AsyncIterator[InProcessGateway]:
    config = FermionConfig.model_validate(
        {
            "backend": "remote",
            "remote": {"urls": urls, "health": FAST_HEALTH, "load_timeout_s": 20, **remote},
            "models": {"linear": {}},
        }
    )
    async with serve_in_process(config, store or ModelStore(tmp / "edge-store")) as gateway:
        yield gateway


async def test_a_model_only_upstream_is_discovered_and_answers_as_upstream(
    cloud_store: ModelStore, tmp_path: Path
) -> None:
    async with _cloud(cloud_store) as cloud, _edge(tmp_path, [cloud.url]) as edge:
        meta = (await edge.client.get("/v2/models/linear")).json()
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert meta["platform"] == "onnxruntime_onnx"
        # The upstream's /config gave its batch size: requests of many rows are accepted.
        config = (await edge.client.get("/v2/models/linear/config")).json()
        assert config["max_batch_size"] == 64
        assert config["artifacts"] == []
        x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
        response = await edge.client.post("/v2/models/linear/infer", json=_body(x))
        np.testing.assert_allclose(_answer(response), expected(x), rtol=1e-6)
        assert response.headers["fermion-location"] == "remote"
        metrics = (await edge.client.get("/metrics")).text
        where = {"model": "linear", "version": "1"}
        answered = "fermion_answered_requests_total"
        assert metric_value(metrics, answered, location="remote", **where) == 1
        sent = "fermion_upstream_requests_total"
        assert metric_value(metrics, sent, outcome="ok", upstream=cloud.url, **where) == 1


async def test_tensors_may_go_upstream_as_json(cloud_store: ModelStore, tmp_path: Path) -> None:
    async with _cloud(cloud_store) as cloud, _edge(tmp_path, [cloud.url], binary=False) as edge:
        x = np.random.default_rng(2).random((3, 4), dtype=np.float32)
        response = await edge.client.post("/v2/models/linear/infer", json=_body(x))
        np.testing.assert_allclose(_answer(response), expected(x), rtol=1e-6)


async def test_answers_the_upstream_would_gzip_arrive_whole(
    cloud_store: ModelStore, tmp_path: Path
) -> None:
    # A Fermion upstream gzips answers of 1 kB and more to clients that accept gzip: the
    # edge must not ask for it (its client does not inflate), in JSON and in binary.
    for binary in (False, True):
        async with (
            _cloud(cloud_store) as cloud,
            _edge(tmp_path, [cloud.url], binary=binary) as edge,
        ):
            x = np.random.default_rng(3).random((64, 4), dtype=np.float32)
            response = await edge.client.post("/v2/models/linear/infer", json=_body(x))
            np.testing.assert_allclose(_answer(response), expected(x), rtol=1e-6)


async def test_an_upstream_error_keeps_its_status(cloud_store: ModelStore, tmp_path: Path) -> None:
    # The cloud takes at most 2 rows per request; the edge does not know it and sends 3.
    async with (
        _cloud(cloud_store, limits={"max_batch": 2}) as cloud,
        _edge(tmp_path, [cloud.url]) as edge,
    ):
        x = np.ones((3, 4), dtype=np.float32)
        response = await edge.client.post("/v2/models/linear/infer", json=_body(x))
        assert response.status_code == 400
        assert "upstream answered 400" in response.json()["error"]
        assert "max batch" in response.json()["error"]
        ok = await edge.client.post("/v2/models/linear/infer", json=_body(x[:2]))
        np.testing.assert_allclose(_answer(ok), expected(x[:2]), rtol=1e-6)


async def test_a_published_version_is_checked_against_the_upstream_metadata(
    cloud_store: ModelStore, tmp_path: Path
) -> None:
    # The edge's own manifest says 'linear' takes [-1, 4] x; the upstream serves a model
    # under that name whose input is 'x' too but whose output is called differently.
    other = ModelStore(tmp_path / "other")
    publish_linear(other, tmp_path / "work")
    edge_store = ModelStore(tmp_path / "edge-store")
    manifest = publish_linear(edge_store, tmp_path / "work")
    renamed = manifest.model_copy(
        update={"outputs": [manifest.outputs[0].model_copy(update={"name": "scores"})]}
    )
    path = edge_store.version_dir("linear", 1) / "manifest.json"
    path.chmod(0o644)
    path.write_text(renamed.model_dump_json())
    async with _cloud(other) as cloud:
        config = FermionConfig.model_validate(
            {
                "backend": "remote",
                "remote": {"urls": [cloud.url], "health": FAST_HEALTH, "load_timeout_s": 1},
            }
        )
        app = create_app(config, store=edge_store)
        async with app.router.lifespan_context(app):
            repository = app.state.repository
            while not repository.served() or repository.served()[0].state.value == "LOADING":
                await asyncio.sleep(0.05)
            sv = repository.served()[0]
            assert sv.state.value == "UNAVAILABLE"
            assert "upstream has no output 'scores'" in sv.reason


async def test_a_batch_without_answer_is_retried_on_another_upstream(
    cloud_store: ModelStore, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(_cloud(cloud_store))
        b = await stack.enter_async_context(_cloud(cloud_store))
        edge = await stack.enter_async_context(
            _edge(tmp_path, [a.url, b.url], health={**FAST_HEALTH, "interval_s": 30})
        )
        x = np.ones((1, 4), dtype=np.float32)
        for _ in range(4):  # spread over both
            _answer(await edge.client.post("/v2/models/linear/infer", json=_body(x)))
        metrics = (await edge.client.get("/metrics")).text
        where = {"model": "linear", "version": "1"}
        sent = "fermion_upstream_requests_total"
        for up in (a, b):  # both took traffic: b is there to take a's
            assert metric_value(metrics, sent, outcome="ok", upstream=up.url, **where) == 2
        await a.stop()  # the health checks are 30 s apart: only requests find out
        answers = await asyncio.gather(
            *(edge.client.post("/v2/models/linear/infer", json=_body(x)) for _ in range(20))
        )
        assert [r.status_code for r in answers] == [200] * 20
        metrics = (await edge.client.get("/metrics")).text
        assert metric_value(metrics, sent, outcome="unavailable", upstream=a.url, **where)
        # After failures_to_open batches in a row without answer, the circuit opened.
        assert metric_value(metrics, "fermion_upstream_up", upstream=a.url, **where) == 0
        assert metric_value(metrics, "fermion_upstream_up", upstream=b.url, **where) == 1


async def test_no_upstream_up_is_503_with_retry_after(
    cloud_store: ModelStore, tmp_path: Path
) -> None:
    async with _cloud(cloud_store) as cloud, _edge(tmp_path, [cloud.url]) as edge:
        await cloud.stop()
        x = np.ones((1, 4), dtype=np.float32)
        while True:  # until the health check has seen it go
            response = await edge.client.post("/v2/models/linear/infer", json=_body(x))
            assert response.status_code == 503
            if "is up" in response.json()["error"]:
                break
            await asyncio.sleep(0.05)
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"] == "no upstream of model linear version 1 is up"


def _across(cloud: str, route: dict[str, Any]) -> FermionConfig:
    """Version 1 from the local store, version 2 the same model computed by ``cloud``."""
    return FermionConfig.model_validate(
        {
            "models": {
                "linear": {
                    "remote": {
                        "urls": [cloud],
                        "policy": "local",
                        "health": FAST_HEALTH,
                        "versions": {2: {"policy": "remote", "version": "1"}},
                    }
                }
            },
            "routes": {"linear": route},
        }
    )


async def test_a_route_splits_between_a_local_and_a_remote_version(
    cloud_store: ModelStore, tmp_path: Path
) -> None:
    edge_store = ModelStore(tmp_path / "edge-store")
    publish_linear(edge_store, tmp_path / "work")
    async with _cloud(cloud_store) as cloud:
        config = _across(cloud.url, {"split": {1: 50, 2: 50}})
        async with serve_in_process(config, edge_store) as edge:
            x = np.random.default_rng(3).random((2, 4), dtype=np.float32)
            seen = set()
            for _ in range(40):
                response = await edge.client.post("/v2/models/linear/infer", json=_body(x))
                np.testing.assert_allclose(_answer(response), expected(x), rtol=1e-6)
                seen.add(
                    (
                        response.headers["fermion-model-version"],
                        response.headers["fermion-location"],
                    )
                )
            assert seen == {("1", "local"), ("2", "remote")}
            # Version 2 is known from the cloud only: no artifact here.
            config2 = (await edge.client.get("/v2/models/linear/versions/2/config")).json()
            assert config2["artifacts"] == [] and config2["artifact"]["backend"] == "remote"


async def test_a_remote_shadow_is_compared_with_the_local_version(
    cloud_store: ModelStore, tmp_path: Path
) -> None:
    edge_store = ModelStore(tmp_path / "edge-store")
    publish_linear(edge_store, tmp_path / "work")
    async with _cloud(cloud_store) as cloud:
        config = _across(cloud.url, {"split": {1: 1}, "shadow": {"version": 2}})
        async with serve_in_process(config, edge_store) as edge:
            x = np.random.default_rng(4).random((1, 4), dtype=np.float32)
            pair = {"model": "linear", "primary": "1", "shadow": "2"}
            for sent in range(1, 11):
                response = await edge.client.post("/v2/models/linear/infer", json=_body(x))
                assert response.headers["fermion-location"] == "local"
                # Each shadow done before the next request: requests sent faster than the
                # remote answers would fill the shadow's queue, and more would be shed
                # (its isolation bound), as a loaded machine showed.
                for _ in range(500):
                    metrics = (await edge.client.get("/metrics")).text
                    done = {
                        outcome: metric_value(
                            metrics, "fermion_shadow_requests_total", outcome=outcome, **pair
                        )
                        or 0.0
                        for outcome in ("ok", "error", "shed")
                    }
                    if sum(done.values()) >= sent:
                        break
                    await asyncio.sleep(0.02)
                assert done == {"ok": sent, "error": 0, "shed": 0}
            assert metric_value(metrics, "fermion_shadow_top1_agreement", **pair) == 1.0
            assert metric_value(metrics, "fermion_shadow_rows_total", agree="true", **pair) == 10
            assert metric_value(metrics, "fermion_shadow_max_abs_diff_sum", **pair) == 0.0
