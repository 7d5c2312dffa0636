"""Readiness tells the truth, and "latest" is the newest READY version.

``GET /v2/health/ready`` is 503, naming the model or version and why, whenever a store
is missing or empty or a configured or store-listed version failed to load (strict, the
default); ``server.strict_readiness: false`` is ready once every served model has a
ready version. Unversioned requests never go to a version that is loading, unloading
or failed: a push/load/remove cycle under load fails no request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from starlette.applications import Starlette

from model_store.store import ModelStore
from serving.config import FermionConfig
from serving.http.app import create_app
from serving.inference.codec import HttpInferBody
from serving.inference.repository import ModelRepository
from serving.inference.service import InferCall
from tests.helpers.ab_models import MODEL

pytestmark = pytest.mark.asyncio

X = np.array([[1.0, 2.0, 3.0, 0.5]], np.float32)
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": X.ravel().tolist()}]}


def _copy_versions(source: ModelStore, root: Path, versions: list[int]) -> ModelStore:
    """A store of its own at ``root`` holding ``versions`` of ``clf`` (renumbered from 1)."""
    store = ModelStore(root)
    for v in versions:
        store.push(source.version_dir(MODEL, v))
    return store


def _tamper(store: ModelStore, version: int) -> None:
    """Change one byte of the version's ONNX artifact: its sha256 no longer matches."""
    manifest = store.manifest(MODEL, version)
    artifact = store.version_dir(MODEL, version) / manifest.artifacts[0].file
    os.chmod(artifact, 0o644)
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 0xFF
    artifact.write_bytes(bytes(data))


@contextlib.asynccontextmanager
async def _gateway(
    config: FermionConfig, store: ModelStore
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """The app with its lifespan running, once start has loaded (or failed) every model."""
    started = asyncio.Event()
    app = create_app(config, store=store, on_ready=lambda _repo: started.set())
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as client,
    ):
        await asyncio.wait_for(started.wait(), 60)
        yield app, client


def _config(store: ModelStore, **extra: Any) -> FermionConfig:
    return FermionConfig.model_validate({"store": {"root": str(store.root)}, **extra})


async def test_a_missing_store_is_not_ready_and_says_so(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "no-such-store")
    async with _gateway(_config(store), store) as (_, client):
        r = await client.get("/v2/health/ready")
    assert r.status_code == 503
    assert r.json()["ready"] is False
    assert "does not exist" in r.json()["reason"] and "no-such-store" in r.json()["reason"]


async def test_an_empty_store_is_not_ready(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    store = ModelStore(tmp_path / "empty")
    async with _gateway(_config(store), store) as (_, client):
        r = await client.get("/v2/health/ready")
    assert r.status_code == 503
    assert "holds no published model" in r.json()["reason"]


async def test_a_configured_model_missing_from_the_store(
    ab_store: ModelStore, tmp_path: Path
) -> None:
    store = _copy_versions(ab_store, tmp_path / "store", [1])
    models: dict[str, Any] = {"models": {MODEL: {}, "typo": {}}}
    async with _gateway(_config(store, **models), store) as (_, client):
        r = await client.get("/v2/health/ready")
        assert (await client.post(f"/v2/models/{MODEL}/infer", json=BODY)).status_code == 200
    assert r.status_code == 503
    [problem] = r.json()["not_ready"]
    assert problem["model"] == "typo" and problem["version"] is None
    assert problem["state"] == "UNAVAILABLE" and "typo" in problem["reason"]
    lenient = _config(store, server={"strict_readiness": False}, **models)
    async with _gateway(lenient, store) as (_, client):
        r = await client.get("/v2/health/ready")
    assert r.status_code == 200
    assert r.json()["ready"] is True
    assert [p["model"] for p in r.json()["not_ready"]] == ["typo"]


async def test_a_failed_newest_version(ab_store: ModelStore, tmp_path: Path) -> None:
    store = _copy_versions(ab_store, tmp_path / "store", [1, 2])
    _tamper(store, 2)
    async with _gateway(_config(store), store) as (_, client):
        ready = await client.get("/v2/health/ready")
        answer = await client.post(f"/v2/models/{MODEL}/infer", json=BODY)
        model_ready = await client.get(f"/v2/models/{MODEL}/ready")
        pinned = await client.post(f"/v2/models/{MODEL}/versions/2/infer", json=BODY)
    # Strict: the failed version is named, with why; unversioned traffic goes to version 1.
    assert ready.status_code == 503
    [problem] = ready.json()["not_ready"]
    assert (problem["model"], problem["version"], problem["state"]) == (MODEL, "2", "UNAVAILABLE")
    assert "sha256" in problem["reason"]
    assert answer.status_code == 200 and answer.headers["fermion-model-version"] == "1"
    assert model_ready.status_code == 200 and model_ready.json()["version"] == "1"
    assert pinned.status_code == 503 and "unavailable" in pinned.json()["error"]
    lenient = _config(store, server={"strict_readiness": False})
    async with _gateway(lenient, store) as (_, client):
        ready = await client.get("/v2/health/ready")
    assert ready.status_code == 200
    assert [(p["version"], p["state"]) for p in ready.json()["not_ready"]] == [("2", "UNAVAILABLE")]


async def test_a_model_with_no_ready_version_is_not_ready_even_when_lenient(
    ab_store: ModelStore, tmp_path: Path
) -> None:
    store = _copy_versions(ab_store, tmp_path / "store", [1])
    _tamper(store, 1)
    lenient = _config(store, server={"strict_readiness": False})
    async with _gateway(lenient, store) as (_, client):
        r = await client.get("/v2/health/ready")
        answer = await client.post(f"/v2/models/{MODEL}/infer", json=BODY)
    assert r.status_code == 503
    assert "clf version 1 unavailable" in r.json()["reason"]
    assert answer.status_code == 503


async def test_push_load_remove_under_load_fails_no_request(
    ab_store: ModelStore, tmp_path: Path
) -> None:
    """Versions 3 (healthy), then a tampered 4, are pushed, loaded and removed under load."""
    store = _copy_versions(ab_store, tmp_path / "store", [1, 2])
    statuses: Counter[int] = Counter()
    answered_by: Counter[str] = Counter()
    readiness: list[int] = []
    stop = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            r = await client.post(f"/v2/models/{MODEL}/infer", json=BODY)
            statuses[r.status_code] += 1
            if r.status_code == 200:
                answered_by[r.headers["fermion-model-version"]] += 1

    async with _gateway(_config(store), store) as (app, client):
        repo: ModelRepository = app.state.repository
        clients = [asyncio.create_task(client_loop(client)) for _ in range(8)]
        for cycle in range(3):
            await asyncio.sleep(0.05)
            pushed = store.push(ab_store.version_dir(MODEL, 2))
            tampered = cycle == 2
            if tampered:
                _tamper(store, pushed.version)
            load = await client.post(f"/v2/repository/models/{MODEL}/load")
            assert load.status_code == 200, load.text
            readiness.append((await client.get("/v2/health/ready")).status_code)
            await asyncio.sleep(0.1)
            store.remove(MODEL, pushed.version)
            assert (await client.post(f"/v2/repository/models/{MODEL}/load")).status_code == 200
            assert pushed.version not in repo.versions(MODEL)
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*clients)
        final = await client.get("/v2/health/ready")
    assert set(statuses) == {200}, statuses
    assert statuses[200] > 100
    # The healthy pushed versions (3, 4) answered while loaded; the tampered 5 never did.
    assert answered_by["3"] > 0 and answered_by["4"] > 0 and answered_by["5"] == 0
    # Strict readiness named the tampered version while it was loaded; not after removal.
    assert readiness == [200, 200, 503]
    assert final.status_code == 200


async def test_an_unversioned_request_whose_version_unloads_meanwhile_goes_to_the_next(
    ab_store: ModelStore, tmp_path: Path
) -> None:
    """The newest version starts unloading while a request's body is still being read."""
    store = _copy_versions(ab_store, tmp_path / "store", [1, 2])
    async with _gateway(_config(store), store) as (app, _):
        service = app.state.service
        body_wanted = asyncio.Event()
        release = asyncio.Event()

        async def read_body() -> bytes:
            body_wanted.set()
            await release.wait()
            return orjson.dumps(BODY)

        state: dict[str, Any] = {}
        body = HttpInferBody(read_body, {}, 1 << 20)
        call = InferCall(MODEL, None, {}, body, time.perf_counter_ns(), state)
        request = asyncio.create_task(service.infer(call))
        await body_wanted.wait()
        assert state["served"] == (MODEL, 2)
        store.remove(MODEL, 2)
        unloading = asyncio.create_task(app.state.repository.load_model(MODEL))
        while 2 in app.state.repository.versions(MODEL):
            if app.state.repository.get(MODEL, "2").batcher.closed:
                break
            await asyncio.sleep(0.001)
        release.set()
        _, headers = await request
        await unloading
    assert headers["fermion-model-version"] == "1"
    assert state["served"] == (MODEL, 1)
