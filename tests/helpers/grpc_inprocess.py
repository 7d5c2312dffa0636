"""The real gateway app in process with its real gRPC server on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
from starlette.applications import Starlette

from model_store.store import ModelStore
from serving.config import FermionConfig
from serving.grpc._proto.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from serving.grpc.server import serve_grpc
from tests.helpers.inprocess import InProcessGateway, serve_in_process

__all__ = ["serve_grpc_in_process"]


@asynccontextmanager
async def serve_grpc_in_process(
    config: FermionConfig, store: ModelStore, **kwargs: Any
) -> AsyncIterator[tuple[InProcessGateway, GRPCInferenceServiceStub]]:
    """The app (HTTP over ASGI) and a stub on a channel to its gRPC server."""
    addresses: list[str] = []

    def companion(app: Starlette) -> AbstractAsyncContextManager[int]:
        s = app.state
        return serve_grpc(
            host="127.0.0.1",
            port=0,
            service=s.service,
            repository=s.repository,
            backend=config.backend,
            access=s.access,
            limiter=s.limiter,
            metrics=s.metrics,
            on_listening=addresses.append,
            grace_s=1.0,
            draining=lambda: s.drain.draining,
        )

    async with (
        serve_in_process(config, store, companions=[companion], **kwargs) as gw,
        grpc.aio.insecure_channel(addresses[0]) as channel,
    ):
        yield gw, GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
