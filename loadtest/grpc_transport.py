"""A gRPC transport for the open-loop engine: V2 ``ModelInfer`` calls on one channel per
gateway (``grpc://host:port``).

The requests are the engine's (built once from the model's metadata, read here over
gRPC), serialized once as ``ModelInferRequest`` messages with every input raw; a call
sends those bytes as they are. A channel is one HTTP/2 connection carrying any number
of calls; ``max_connections`` caps the calls in flight per gateway (a call beyond waits,
and its wait counts in its latency). Each call carries the API key as metadata and a
gRPC deadline of the answer timeout. A failed call's outcome is the HTTP status its gRPC
code stands for, described as ``"<status> <gRPC code>: <message>"``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import grpc

from loadtest.gateway import GatewayError
from loadtest.grpc_client import (
    MODEL_INFER,
    AsyncGrpcInfer,
    encode_requests,
    grpc_address,
    model_metadata,
)
from loadtest.payloads import Payload
from loadtest.transport import Call, Outcome, TransportOptions

__all__ = ["GrpcTransport"]

#: Seconds to wait for the model's metadata before the load.
_METADATA_TIMEOUT_S = 30.0


class GrpcTransport:
    """Sends V2 inference requests as gRPC ``ModelInfer`` calls to one or more gateways."""

    def __init__(self, options: TransportOptions) -> None:
        if not options.targets:
            raise ValueError("no gateway address")
        self._addresses = [grpc_address(t) for t in options.targets]
        self._clients = [AsyncGrpcInfer(a) for a in self._addresses]
        self._slots = [asyncio.Semaphore(options.max_connections) for _ in self._addresses]
        self._next = itertools.cycle(range(len(self._addresses)))
        self._headers = dict(options.headers)
        self._metadata = tuple(options.headers.items())
        self._timeout_s = options.timeout_s

    async def metadata(self, model: str, version: str | None) -> dict[str, Any]:
        """``ModelMetadata`` of the first gateway, shaped as the HTTP metadata."""
        address = self._addresses[0]
        try:
            return await asyncio.to_thread(
                model_metadata, address, model, version, self._headers, _METADATA_TIMEOUT_S
            )
        except grpc.RpcError as e:
            code: grpc.StatusCode = e.code()
            details = " ".join(str(e.details() or "").split())
            raise GatewayError(f"gRPC ModelMetadata at {address}: {code.name} {details}") from None

    def calls(self, model: str, version: str | None, payloads: Sequence[Payload]) -> list[Call]:
        """One serialized ``ModelInferRequest`` per payload (its inputs, raw)."""
        requests = encode_requests([p.tensors for p in payloads], model, version)
        return [Call(MODEL_INFER, request) for request in requests]

    async def send(self, call: Call) -> Outcome:
        """Send ``call`` to the next gateway in turn; a failed call is an ``Outcome``."""
        i = next(self._next)
        async with self._slots[i]:
            answer = await self._clients[i](
                call.body, self._metadata + call.headers, self._timeout_s
            )
        if answer.error is not None:
            return Outcome(answer.status, error=answer.error)
        return Outcome(200, version=answer.version)

    async def aclose(self) -> None:
        """Close every channel."""
        for client in self._clients:
            await client.close()
