"""The route table: changes by hand (with or without a file), its windows and its metric family."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serving.config import RouteConfig
from serving.errors import InvalidInput
from serving.inference.repository import ModelRepository
from serving.observability.metrics import GatewayMetrics
from serving.traffic.route_table import RolloutConflict, RouteTable
from serving.traffic.shadow import ShadowMirror
from tests.helpers.ab_models import FAIL_AT, MODEL
from tests.serving.traffic.infer_calls import infer, service


async def _versions(table: RouteTable, repo: ModelRepository, n: int) -> set[int]:
    """The versions that took ``n`` requests through ``table``."""
    svc = service(table, repo)
    taken = set()
    for _ in range(n):
        state: dict[str, object] = {}
        await infer(svc, np.ones((1, 4), np.float32), state=state)
        served = state["served"]
        assert isinstance(served, tuple)
        taken.add(int(served[1]))
    return taken


async def test_routes_set_and_removed_by_hand_without_a_file(repository: ModelRepository) -> None:
    table = RouteTable({}, repository)  # no config file: changes live in memory
    assert await _versions(table, repository, 5) == {4}  # no route: the latest version
    assert table.remove(MODEL) is None  # nothing to remove
    await table.set_route(MODEL, RouteConfig(split={1: 1, 2: 0}))
    route = table.get(MODEL)
    assert route is not None and route.name == MODEL
    assert await _versions(table, repository, 5) == {1}
    await table.set_route(MODEL, None)
    assert table.get(MODEL) is None and table.routes() == {}
    assert await _versions(table, repository, 5) == {4}
    with pytest.raises(InvalidInput) as raised:
        await table.set_route(MODEL, None)
    assert raised.value.message == f"no route {MODEL!r}"


async def test_a_locked_route_refuses_changes_by_hand_until_unlocked(
    repository: ModelRepository,
) -> None:
    table = RouteTable({MODEL: RouteConfig(split={1: 1})}, repository)
    configured = table.get(MODEL)
    assert configured is not None and configured.name == MODEL
    table.unlock(MODEL)  # not locked: nothing to do
    table.lock(MODEL, "a rollout is running")
    with pytest.raises(RolloutConflict, match=r"^a rollout is running$"):
        await table.set_route(MODEL, RouteConfig(split={2: 1}))
    table.unlock(MODEL)
    await table.set_route(MODEL, RouteConfig(split={2: 1}))
    assert await _versions(table, repository, 3) == {2}


async def test_a_window_gives_each_request_once(repository: ModelRepository) -> None:
    table = RouteTable({MODEL: RouteConfig(split={1: 1})}, repository)
    first = table.window(MODEL, 1).take()  # what came before this test
    await _versions(table, repository, 3)
    assert table.window(MODEL, 1).take().requests == 3
    await _versions(table, repository, 2)
    assert table.window(MODEL, 1).take().requests == 2
    assert table.window(MODEL, 1).take().requests == 0
    assert first.errors == 0


async def test_the_route_family_counts_routed_requests_by_version_and_outcome(
    repository: ModelRepository,
) -> None:
    table = RouteTable({}, repository)
    metrics = GatewayMetrics()
    metrics.register(table)
    registry = metrics.registry

    def count(version: int, outcome: str) -> float:
        labels = {"model": MODEL, "version": str(version), "outcome": outcome}
        return registry.get_sample_value("fermion_route_requests_total", labels) or 0.0

    # Not exported before the model has a route (set at run time here), nor for a model
    # without one (one sorting before it, served alongside).
    assert registry.get_sample_value("fermion_route_requests_total", {"model": MODEL}) is None
    other = repository.counters.version("a-model", 1)
    other.answered(time.perf_counter_ns())
    await table.set_route(MODEL, RouteConfig(split={1: 1, 3: 1}))
    before = {(v, o): count(v, o) for v in (1, 3) for o in ("ok", "error")}
    svc = service(table, repository)
    bad = np.full((1, 4), FAIL_AT + 1, np.float32)  # version 3 fails on these
    answered = {1: 0, 3: 0}
    for _ in range(40):
        state: dict[str, object] = {}
        try:
            await infer(svc, bad, state=state)
        except Exception as e:
            assert getattr(e, "status_code", None) == 500
        served = state["served"]
        assert isinstance(served, tuple)
        answered[int(served[1])] += 1
    assert answered[1] > 0 and answered[3] > 0, answered
    assert count(1, "ok") - before[(1, "ok")] == answered[1]
    assert count(1, "error") - before[(1, "error")] == 0
    assert count(3, "error") - before[(3, "error")] == answered[3]
    assert count(3, "ok") - before[(3, "ok")] == 0
    unrouted = {"model": "a-model", "version": "1", "outcome": "ok"}
    assert (
        other.ok == 1
        and registry.get_sample_value("fermion_route_requests_total", unrouted) is None
    )


async def test_copies_go_to_the_shadow_mirror_it_is_given(repository: ModelRepository) -> None:
    mirror = ShadowMirror(repository)
    config = RouteConfig.model_validate({"split": {1: 1}, "shadow": {"version": 2}})
    table = RouteTable({MODEL: config}, repository, shadow=mirror)
    assert table.shadow is mirror
    await _versions(table, repository, 3)  # 3 copies at most: below the queue bound of 4
    while mirror.in_flight:
        await asyncio.sleep(0.01)
    total = mirror.window(MODEL, 1, 2).total
    assert (total.mirrored, total.errors, total.shed) == (3, 0, 0)
