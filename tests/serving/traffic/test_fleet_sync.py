"""The fleet sync loop against a real redis-server: joining, and leaving when stopped."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from model_store.store import ModelStore
from serving.config import ControlConfig, FermionConfig
from serving.control.store import ControlStore, create_store
from serving.inference.backends.local import LocalBackend
from serving.inference.repository import ModelRepository
from serving.traffic.canary import RolloutController
from serving.traffic.fleet import FleetSync, Gateway
from serving.traffic.route_file import RouteFile
from serving.traffic.route_table import RouteTable
from tests.helpers.redis_server import RedisServer


def _store(control: ControlConfig) -> ControlStore:
    store = create_store(control)
    assert store is not None
    return store


def _sync(control: ControlConfig, repository: ModelRepository, n: int) -> FleetSync:
    store = _store(control)
    gateway = Gateway(address=f"127.0.0.1:{9000 + n}", backend="local")
    routes = RouteTable({}, repository, route_file=RouteFile(None), store=store)
    rollouts = RolloutController(
        routes, repository, None, store=store, holder=gateway.id, retry_s=control.sync_interval_s
    )
    return FleetSync(store, gateway, control, routes, rollouts)


async def test_a_stopped_sync_ends_and_leaves_the_fleet_whenever_it_is_stopped(
    redis: RedisServer, tmp_path: Path
) -> None:
    # Stopped at many moments of its loop (mid-command included), the sync must end every
    # time: a cancellation swallowed by the Redis client kept it looping, and the gateway's
    # shutdown waited for it forever (the likely cause of a CI run in which a worker of
    # `fermion serve --workers 2` never finished its shutdown).
    control = ControlConfig(store=redis.url, sync_interval_s=0.02, heartbeat_s=0.1)
    config = FermionConfig.model_validate({"store": {"root": str(tmp_path)}})
    store = ModelStore(tmp_path)
    backend = LocalBackend(config, store)
    repository = ModelRepository(config, store, backend)
    watcher = _store(control)
    rng = random.Random(3)
    try:
        for n in range(40):
            sync = _sync(control, repository, n)
            await sync.start()
            await asyncio.sleep(0.1 + rng.random() * 0.05)
            stopping = asyncio.create_task(sync.stop())
            done, _ = await asyncio.wait([stopping], timeout=5.0)
            assert done, f"stop {n} still waits for the sync loop"
            stopping.result()
            ids = [g.id for g in await watcher.gateways()]
            assert sync.gateway.id not in ids
    finally:
        await watcher.close()
