"""Fixtures of the serving tests: the A/B test models, served in process, and a tracer
whose spans stay in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from model_store.store import ModelStore
from serving.config import TracingConfig
from serving.inference.repository import ModelRepository
from serving.observability import tracing
from tests.helpers.ab_models import build_ab_store, serve_in_process


@pytest.fixture(scope="session")
def ab_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return build_ab_store(tmp_path_factory.getbasetemp() / "ab-store")


@pytest.fixture
async def repository(ab_store: ModelStore) -> AsyncIterator[ModelRepository]:
    async with serve_in_process(ab_store) as repo:
        yield repo


@pytest.fixture()
def exporter() -> Iterator[InMemorySpanExporter]:
    """Tracing on, every span sampled, finished spans kept here; off again afterwards."""
    exporter = InMemorySpanExporter()
    tracing.configure(TracingConfig(), exporter=exporter)
    yield exporter
    tracing.shutdown()
