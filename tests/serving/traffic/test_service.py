"""The inference service over a real route table: order of checks, sticky moves, one count."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from serving.config import RouteConfig, load_config
from serving.errors import ModelNotFound, Overloaded
from serving.inference.batcher import DynamicBatcher
from serving.inference.codec import HttpInferBody
from serving.inference.repository import ModelRepository
from serving.inference.service import InferCall
from serving.traffic.route_file import RouteFile
from serving.traffic.route_table import RouteTable
from tests.helpers.ab_models import MODEL
from tests.serving.traffic.infer_calls import service


def _body(x: np.ndarray, parameters: dict[str, object] | None = None) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return orjson.dumps({"inputs": [tensor], "parameters": parameters or {}})


async def test_an_unknown_model_fails_before_its_body_is_read(
    repository: ModelRepository,
) -> None:
    svc = service(RouteTable({}, repository), repository)
    read: list[bool] = []

    async def read_body() -> bytes:
        read.append(True)
        return b"{}"

    body = HttpInferBody(read_body, {}, 1 << 20)
    call = InferCall("ghost", None, {}, body, time.perf_counter_ns(), {})
    with pytest.raises(ModelNotFound, match="unknown model 'ghost'"):
        await svc.infer(call)
    assert read == []


async def test_a_sticky_parameter_moves_the_request_and_is_counted_once(
    repository: ModelRepository,
) -> None:
    config = RouteConfig.model_validate({"split": {1: 50, 2: 50}, "sticky": {"parameter": "user"}})
    table = RouteTable({MODEL: config}, repository)
    route = table.get(MODEL)
    assert route is not None
    svc = service(table, repository)
    x = np.ones((1, 4), np.float32)
    users = [f"user-{i}" for i in range(40)]
    answered: dict[str, int] = {}
    for user in users:
        body = _body(x, {"user": user})

        async def read_body(body: bytes = body) -> bytes:
            return body

        state: dict[str, object] = {}
        http_body = HttpInferBody(read_body, {}, 1 << 20)
        call = InferCall(MODEL, None, {}, http_body, time.perf_counter_ns(), state)
        _, headers = await svc.infer(call)
        version = headers["fermion-model-version"]
        assert version == route.split.pick_sticky(user)  # whatever the first draw was
        assert state["served"] == (MODEL, int(version))
        answered[version] = answered.get(version, 0) + 1
    assert set(answered) == {"1", "2"}
    for version, n in answered.items():
        figures = table.window(MODEL, int(version)).take()
        assert (figures.requests, figures.errors) == (n, 0)
        assert repository.counters.version(MODEL, int(version)).ok == n


async def test_a_request_its_queue_would_shed_is_refused_before_its_body_is_read(
    repository: ModelRepository,
) -> None:
    svc = service(RouteTable({}, repository), repository)
    _, batcher = repository.resolve(MODEL, "1")
    assert isinstance(batcher, DynamicBatcher)
    for _ in range(batcher.max_queue_size):  # every place taken by requests being read
        batcher.admit()
    read: list[bool] = []

    async def read_body() -> bytes:
        read.append(True)
        return _body(np.ones((1, 4), np.float32))

    call = InferCall(
        MODEL, "1", {}, HttpInferBody(read_body, {}, 1 << 20), time.perf_counter_ns(), {}
    )
    with pytest.raises(Overloaded, match="queue full") as refused:
        await svc.infer(call)
    assert read == [] and refused.value.headers()["Retry-After"] == "1"
    # The connection can ask the same from the head alone, and gets the same answer.
    assert isinstance(svc.refusal(MODEL, "1", {}), Overloaded)
    batcher.release()
    assert svc.refusal(MODEL, "1", {}) is None
    content, _ = await svc.infer(call)  # the freed place is taken, then handed to the queue
    assert read == [True] and orjson.loads(content)["model_version"] == "1"
    for _ in range(batcher.max_queue_size - 1):
        batcher.release()
    assert batcher.admitted == 0


async def test_every_request_during_route_changes_sees_the_old_or_the_new_split(
    repository: ModelRepository, tmp_path: Path
) -> None:
    # A route-less moment would send requests to the latest version (4): never seen here.
    path = tmp_path / "fermion.yaml"
    path.write_text("batching: {max_batch_size: 8}\n")
    splits = [RouteConfig(split={1: 100}), RouteConfig(split={1: 0, 2: 100})]
    table = RouteTable({MODEL: splits[0]}, repository, route_file=RouteFile(path))
    svc = service(table, repository)
    body = _body(np.ones((1, 4), np.float32))
    answered: list[str] = []
    changing = True

    async def read_body() -> bytes:
        return body

    async def ask() -> str:
        call = InferCall(
            MODEL, None, {}, HttpInferBody(read_body, {}, 1 << 20), time.perf_counter_ns(), {}
        )
        _, headers = await svc.infer(call)
        return headers["fermion-model-version"]

    async def client() -> None:
        while changing:
            answered.append(await ask())

    clients = [asyncio.create_task(client()) for _ in range(4)]
    for i in range(20):
        await table.set_route(MODEL, splits[(i + 1) % 2])  # the file is written each time
        await asyncio.sleep(0.002)
    changing = False
    await asyncio.gather(*clients)
    assert len(answered) > 40 and set(answered) == {"1", "2"}, answered
    assert await ask() == "1"  # the last split set: {1: 100}
    assert load_config(path).routes[MODEL] == splits[0]
