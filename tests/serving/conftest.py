"""Fixtures of the routing, shadow and rollout tests: the A/B test models, served in process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from model_store.store import ModelStore
from serving.inference.repository import ModelRepository
from tests.helpers.ab_models import build_ab_store, serve_in_process


@pytest.fixture(scope="session")
def ab_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return build_ab_store(tmp_path_factory.getbasetemp() / "ab-store")


@pytest.fixture
async def repository(ab_store: ModelStore) -> AsyncIterator[ModelRepository]:
    async with serve_in_process(ab_store) as repo:
        yield repo
