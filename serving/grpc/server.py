"""The gRPC server's life: bound beside the HTTP app, on its event loop, over its state.

``serve_grpc`` is a ``create_app`` companion: it starts with the app (once the backend
has started, so the port answers ServerReady false while models load) and stops first at
shutdown, giving calls in flight ``grace_s`` to finish. Both transports share one
``InferenceService``, so one set of batchers, replicas, routes, limits and counters.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from serving.auth.access import AccessControl
from serving.grpc._proto.grpc_service_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from serving.grpc.gate import CallGate
from serving.grpc.servicer import InferenceServicer
from serving.inference.limits import RateLimiter
from serving.inference.repository import ModelRepository
from serving.inference.service import InferenceService
from serving.observability import tracing
from serving.observability.metrics import GatewayMetrics

__all__ = ["grpc_address", "serve_grpc"]


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC writes an address (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.asynccontextmanager
async def serve_grpc(
    *,
    host: str,
    port: int,
    service: InferenceService[Any],
    repository: ModelRepository,
    backend: str,
    access: AccessControl | None,
    limiter: RateLimiter | None,
    metrics: GatewayMetrics | None,
    on_listening: Callable[[str], None] | None = None,
    grace_s: float = 10.0,
    share_port: bool = False,
    draining: Callable[[], bool] = lambda: False,
) -> AsyncIterator[int]:
    """Serve ``inference.GRPCInferenceService`` on ``host:port`` (0: a free port) meanwhile.

    Yields the bound port, after calling ``on_listening`` with the address. Messages
    over ``service.max_body_bytes`` are refused by gRPC (RESOURCE_EXHAUSTED). The port
    is shared (SO_REUSEPORT) only with ``share_port``, by the workers of one host; else
    a port in use fails the start.
    """
    gate = CallGate(
        access=access,
        limiter=limiter,
        on_reject=metrics.reject if metrics is not None else None,
        tracer=tracing.current_tracer(),
    )
    servicer = InferenceServicer(
        service=service,
        repository=repository,
        gate=gate,
        backend=backend,
        draining=draining,
    )
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1 if share_port else 0),
            ("grpc.max_receive_message_length", service.max_body_bytes),
            ("grpc.max_send_message_length", -1),
        ]
    )
    add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    try:
        bound = server.add_insecure_port(grpc_address(host, port))
    except RuntimeError as e:
        raise OSError(f"cannot listen for gRPC on {grpc_address(host, port)}: {e}") from None
    await server.start()
    try:
        if on_listening is not None:
            on_listening(grpc_address(host, bound))
        yield bound
    finally:
        await server.stop(grace_s)
