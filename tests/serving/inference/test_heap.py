"""The gateway's heap policy: what it freezes, the threshold it sets, what it reports."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from model_store.store import ModelStore
from serving.config import FermionConfig
from serving.inference.backends.local import LocalBackend
from serving.inference.heap import HeapPolicy
from serving.inference.repository import ModelRepository
from tests.helpers.ab_models import MODEL
from tests.helpers.prom import metric_value


@pytest.fixture
def policy() -> Iterator[HeapPolicy]:
    heap = HeapPolicy(freeze=True, young_threshold=12_345)
    yield heap
    heap.uninstall()
    gc.unfreeze()  # the test process's heap goes back to the collector


def _tracked(obj: object) -> bool:
    return any(o is obj for generation in range(3) for o in gc.get_objects(generation))


def test_settle_takes_the_long_lived_objects_out_of_every_collection(policy: HeapPolicy) -> None:
    long_lived = {"model": ["weights"]}
    assert _tracked(long_lived)
    policy.settle()
    assert not _tracked(long_lived)  # frozen: no collection walks it again
    assert gc.get_freeze_count() > 0
    later = {"request": [1]}
    assert _tracked(later)  # what comes after is collected as before


def test_settle_collects_the_garbage_of_before_instead_of_freezing_it(policy: HeapPolicy) -> None:
    cycle: list[object] = []
    cycle.append(cycle)
    collected = []
    gc.callbacks.append(lambda phase, info: collected.append(info["collected"]))
    try:
        del cycle
        policy.settle()
    finally:
        gc.callbacks.pop()
    assert sum(collected) >= 1


def test_without_freeze_settle_leaves_the_heap_alone() -> None:
    before = gc.get_freeze_count()
    HeapPolicy(freeze=False).settle()
    assert gc.get_freeze_count() == before


def test_install_sets_the_young_threshold_and_uninstall_restores_it(policy: HeapPolicy) -> None:
    original = gc.get_threshold()
    policy.install()
    assert gc.get_threshold() == (12_345, *original[1:])
    policy.uninstall()
    assert gc.get_threshold() == original


def test_collections_are_timed_by_generation_in_the_metrics(policy: HeapPolicy) -> None:
    registry = CollectorRegistry()
    registry.register(policy)
    policy.install()
    gc.collect(0)
    gc.collect(2)
    text = generate_latest(registry).decode()
    assert metric_value(text, "fermion_gc_pause_seconds_count", generation="0") == 1
    assert metric_value(text, "fermion_gc_pause_seconds_count", generation="1") == 0
    assert metric_value(text, "fermion_gc_pause_seconds_count", generation="2") == 1
    policy.uninstall()
    gc.collect(0)  # no longer timed
    text = generate_latest(registry).decode()
    assert metric_value(text, "fermion_gc_pause_seconds_count", generation="0") == 1
    assert metric_value(text, "fermion_gc_frozen_objects") == gc.get_freeze_count()


async def test_the_repository_reports_loads_between_start_and_stop_only(
    ab_store: ModelStore,
) -> None:
    # Each report is a full collection (settle): the start-up loads are settled once by
    # the app after them, and the unloads of a stopping gateway not at all.
    config = FermionConfig.model_validate({"store": {"root": str(ab_store.root)}})
    backend = LocalBackend(config, ab_store)
    changes: list[str] = []
    repository = ModelRepository(
        config, ab_store, backend, on_change=lambda: changes.append("changed")
    )
    await backend.start()
    try:
        await repository.start()
        assert changes == []
        await repository.load_model(MODEL)  # a load through the repository API
        assert changes == ["changed"]
        await repository.unload_model(MODEL)
        assert changes == ["changed", "changed"]
        await repository.load_model(MODEL)
        await repository.stop()
        assert changes == ["changed"] * 3
    finally:
        await backend.stop()
