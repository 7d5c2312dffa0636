"""Edge and cloud: a gateway computing a model on another gateway, with a local fallback.

Real processes: a "cloud" ``fermion serve`` and "edge" ones in front of it (backend
local with ``models.linear.remote``, or backend remote), all on loopback ports.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model_store.store import ModelStore
from tests.helpers.prom import metric_value
from tests.helpers.remote_models import expected, publish_linear
from tests.helpers.servers import RunningServer, start_server, stop_server

pytestmark = pytest.mark.e2e

#: Active health checks of the edges: how fast a cloud that comes back gets traffic again.
INTERVAL_S = 0.5


def _body(x: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ]
    }


def _edge_config(cloud: str, policy: str, **remote: Any) -> str:
    extra = "".join(f"      {key}: {value}\n" for key, value in remote.items())
    return f"""
models:
  linear:
    remote:
      urls: [{cloud}]
      policy: {policy}
      health: {{interval_s: {INTERVAL_S}, timeout_s: 2.0}}
{extra}"""


@pytest.fixture(scope="module")
def cloud_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    tmp = tmp_path_factory.mktemp("cloud")
    store = ModelStore(tmp / "store")
    publish_linear(store, tmp / "work")
    return store


@pytest.fixture
def cloud(cloud_store: ModelStore, tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(cloud_store.root, _dir(tmp_path / "cloud"))
    yield running
    stop_server(running)


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _edge_store(tmp: Path, slow: int = 0) -> Path:
    store = ModelStore(tmp / f"edge-store-{slow}")
    publish_linear(store, tmp / "work", slow=slow)
    return store.root


class _Load:
    """Closed-loop clients sending requests until stopped (or ``each`` requests apiece);
    every answer is recorded."""

    def __init__(self, url: str, clients: int, each: int | None = None) -> None:
        self._url = url
        self._clients = clients
        self._each = each
        self._stop = asyncio.Event()
        #: (sent at, status, location, seconds)
        self.answers: list[tuple[float, int, str, float]] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        async with httpx.AsyncClient(base_url=self._url, timeout=30) as client:
            sent_count = 0
            while not self._stop.is_set() and sent_count != self._each:
                sent_count += 1
                x = rng.random((1, 4), dtype=np.float32)
                sent = time.monotonic()
                try:
                    r = await client.post("/v2/models/linear/infer", json=_body(x))
                    status, where = r.status_code, r.headers.get("fermion-location", "")
                    if status == 200:
                        y = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32)
                        np.testing.assert_allclose(y, expected(x)[0], rtol=1e-5)
                except httpx.TransportError:
                    status, where = 0, ""
                self.answers.append((sent, status, where, time.monotonic() - sent))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self._clients)]

    async def until(self, what: str, enough: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Wait until ``enough()`` holds (a count of answers, not a time: a slow host
        answers fewer in a second)."""
        deadline = time.monotonic() + timeout_s
        while not enough():
            assert time.monotonic() < deadline, f"never {what} within {timeout_s}s"
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._stop.set()
        await self.finished()

    async def finished(self) -> None:
        await asyncio.gather(*self._tasks)


async def test_edge_answers_as_the_cloud_and_falls_back_locally_while_it_is_down(
    cloud_store: ModelStore, cloud: RunningServer, tmp_path: Path
) -> None:
    edge = start_server(
        _edge_store(tmp_path), _dir(tmp_path / "edge"), _edge_config(cloud.url, "remote-first")
    )
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            x = np.random.default_rng(1).random((6, 4), dtype=np.float32)
            at_edge = await client.post(f"{edge.url}/v2/models/linear/infer", json=_body(x))
            at_cloud = await client.post(f"{cloud.url}/v2/models/linear/infer", json=_body(x))
            assert at_edge.headers["fermion-location"] == "remote"
            assert at_edge.json()["outputs"] == at_cloud.json()["outputs"]

            load = _Load(edge.url, clients=8)
            load.start()
            # Three answers a client from the cloud first, so that the requests in flight
            # when it dies (answered locally) are a minority of those sent before.
            await load.until(
                "24 answers from the cloud",
                lambda: sum(where == "remote" for _, _, where, _ in load.answers) >= 24,
            )
            cloud.process.kill()  # under load, without warning
            killed = time.monotonic()
            await asyncio.sleep(1.5)
            await load.until(
                "8 answers to requests sent after the cloud died",
                lambda: sum(sent > killed + 0.2 for sent, _, _, _ in load.answers) >= 8,
            )
            await load.stop()
            statuses = [status for _, status, _, _ in load.answers]
            assert statuses.count(200) == len(statuses), "a request failed while the cloud died"
            before = [where for sent, _, where, _ in load.answers if sent < killed - 0.2]
            after = [where for sent, _, where, _ in load.answers if sent > killed + 0.2]
            assert before.count("remote") > len(before) / 2  # the cloud computed, mostly
            assert after and set(after) == {"local"}

            back = await asyncio.to_thread(
                start_server, cloud_store.root, _dir(tmp_path / "cloud-back"), port=cloud.port
            )
            try:
                ready = time.monotonic()
                while True:
                    r = await client.post(f"{edge.url}/v2/models/linear/infer", json=_body(x))
                    assert r.status_code == 200
                    if r.headers["fermion-location"] == "remote":
                        break
                    await asyncio.sleep(0.05)
                # The active check, not a request, brought it back: within a few intervals.
                assert time.monotonic() - ready < 5 * INTERVAL_S
            finally:
                stop_server(back)
    finally:
        stop_server(edge)


async def _measure(url: str, clients: int, each: int) -> _Load:
    """``clients`` at once, ``each`` requests apiece (a count, not a time: on a slow host
    the shares and percentiles still rest on the same number of answers)."""
    load = _Load(url, clients, each)
    load.start()
    await load.finished()
    assert {status for _, status, _, _ in load.answers} == {200}
    return load


def _share(load: _Load, location: str) -> float:
    return [w for _, _, w, _ in load.answers].count(location) / len(load.answers)


def _p99(load: _Load) -> float:
    return float(np.percentile([seconds for *_, seconds in load.answers], 99))


async def test_a_slowed_local_replica_overflows_to_the_cloud(
    cloud: RunningServer, tmp_path: Path
) -> None:
    depth, clients, slow = 1, 12, 1280
    # The local replica computes one request at a time (the slowed one some 40 ms each on
    # an idle core); the cloud takes batches of up to 64.
    config = (
        _edge_config(cloud.url, "local-first", overflow_queue_depth=depth, max_batch_size=64)
        + "batching: {max_batch_size: 1}\n"
    )
    edges = {
        s: start_server(_edge_store(tmp_path, s), _dir(tmp_path / f"edge-{s}"), config)
        for s in (0, slow)
    }
    try:
        fast = await _measure(edges[0].url, clients, 8)
        slowed = await _measure(edges[slow].url, clients, 8)
        assert _share(slowed, "remote") > _share(fast, "remote")
        # Baseline: the same slowed edge once the cloud is gone, every request computed
        # locally: they wait behind up to `clients` others, not behind `depth`.
        cloud.process.kill()
        async with httpx.AsyncClient() as client:
            up = {"model": "linear", "version": "1", "upstream": cloud.url}
            while metric_value(
                (await client.get(f"{edges[slow].url}/metrics")).text, "fermion_upstream_up", **up
            ):
                await asyncio.sleep(0.1)
        alone = await _measure(edges[slow].url, clients, 8)
        assert _share(alone, "local") == 1.0
        assert _p99(slowed) < _p99(alone), (_p99(slowed), _p99(alone))
    finally:
        for edge in edges.values():
            stop_server(edge)
