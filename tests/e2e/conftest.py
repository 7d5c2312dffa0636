"""The real gateway as a subprocess, shared by the e2e tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from model_store.store import ModelStore
from tests.helpers.servers import RunningServer, start_server, stop_server

#: Small enough that the body-limit test stays cheap; large enough for a batch of 64.
MAX_BODY_BYTES = 1024 * 1024

CONFIG = f"""
server:
  max_body_bytes: {MAX_BODY_BYTES}
batching:
  max_batch_size: 64
  max_queue_size: 4096
"""


@pytest.fixture(scope="session")
def server(
    demo_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    running = start_server(demo_store.root, tmp_path_factory.mktemp("server"), CONFIG)
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def grpc_server(
    demo_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A gateway serving gRPC too (``grpc_address``), with the same configuration."""
    running = start_server(demo_store.root, tmp_path_factory.mktemp("grpc"), CONFIG, grpc=True)
    yield running
    stop_server(running)
