"""Shared fixtures: the trained demo, published once into a store of its own; a redis-server."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from model_store.store import ModelStore
from tests.helpers.demo import PublishedDemo
from tests.helpers.redis_server import RedisServer, start_redis, stop_redis


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> PublishedDemo:
    """Both demo versions, trained and published once for the whole session."""
    from compilers.demo import publish_demo

    store = ModelStore(tmp_path_factory.mktemp("demo-store"))
    start = time.perf_counter()
    manifests = publish_demo(store)
    return PublishedDemo(store=store, manifests=manifests, seconds=time.perf_counter() - start)


@pytest.fixture(scope="session")
def demo_store(demo: PublishedDemo) -> ModelStore:
    """A store holding the two trained demo versions of ``digits`` (shared, never modified)."""
    return demo.store


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server of the test module's own, on a free loopback port."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop_redis(server)
