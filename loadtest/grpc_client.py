"""The gRPC side of ``fermion loadtest``: V2 ``ModelInfer`` calls made cheap to send.

Requests are built from the model's metadata (``ModelMetadata`` over gRPC, shaped like
the HTTP metadata) with ``loadtest.payloads.build_tensors``, inputs in
``raw_input_contents``, and serialized once; a call sends those bytes as they are and
reads back the served version. ``GrpcInfer`` is the blocking client (the locust user runs
it under gevent, after ``init_gevent``); ``AsyncGrpcInfer`` the asyncio one (an
open-loop engine or a benchmark awaits it). Both speak through the stubs that
``tritonclient.grpc`` ships: a load test is a client like any other.

A failed call is described as ``"<HTTP status> <gRPC code>: <message>"`` (503 for
UNAVAILABLE, ...), so one report reads the same whichever transport was measured.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
import numpy as np

from loadtest.payloads import Tensors, raw_tensor

__all__ = [
    "HTTP_STATUS",
    "MODEL_INFER",
    "AsyncGrpcInfer",
    "GrpcAnswer",
    "GrpcInfer",
    "encode_requests",
    "grpc_address",
    "init_gevent",
    "model_metadata",
]

#: The V2 gRPC method every load-test call invokes.
MODEL_INFER: Final = "/inference.GRPCInferenceService/ModelInfer"
#: No retries (every call is measured as sent) and no cap on an answer's size (gRPC's
#: default refuses answers over 4 MiB: a large output is the server's result, not an error).
_CHANNEL_OPTIONS: Final = [("grpc.enable_retries", 0), ("grpc.max_receive_message_length", -1)]

#: The HTTP status a gRPC status stands for (Fermion's README table, read backwards).
HTTP_STATUS: Final = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def grpc_address(url: str) -> str:
    """``host:port`` of ``grpc://host:port`` (or of ``host:port`` itself); ValueError for
    another scheme or a path (an HTTP URL given with ``--protocol grpc``)."""
    address = url.removeprefix("grpc://").rstrip("/")
    if not address or "://" in address or "/" in address:
        raise ValueError(f"invalid gRPC address {url!r} (e.g. grpc://127.0.0.1:8001)")
    return address


def _pb() -> Any:
    from tritonclient.grpc import service_pb2

    return service_pb2


def init_gevent() -> None:
    """Let grpc's blocking calls yield to gevent (locust); call before any channel exists."""
    from grpc.experimental import gevent as grpc_gevent

    grpc_gevent.init_gevent()


def model_metadata(
    address: str, model: str, version: str | None, headers: Mapping[str, str], timeout_s: float
) -> dict[str, Any]:
    """The model's V2 metadata over gRPC, shaped as ``GET /v2/models/{m}`` answers it."""
    pb = _pb()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelMetadata",
            request_serializer=pb.ModelMetadataRequest.SerializeToString,
            response_deserializer=pb.ModelMetadataResponse.FromString,
        )
        meta = call(
            pb.ModelMetadataRequest(name=model, version=version or ""),
            metadata=tuple(headers.items()),
            timeout=timeout_s,
        )
    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]}
            for t in meta.inputs
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]}
            for t in meta.outputs
        ],
    }


def encode_requests(
    tensor_sets: Sequence[Tensors], model: str, version: str | None = None
) -> list[bytes]:
    """Serialized ``ModelInferRequest`` messages, one per set of inputs (all raw contents)."""
    pb = _pb()
    out = []
    for tensors in tensor_sets:
        request = pb.ModelInferRequest(model_name=model, model_version=version or "")
        for spec, arr in tensors:
            datatype = spec["datatype"]
            request.inputs.add(name=spec["name"], datatype=datatype, shape=list(arr.shape))
            request.raw_input_contents.append(raw_tensor(datatype, np.asarray(arr)))
        out.append(request.SerializeToString())
    return out


@dataclass(frozen=True, slots=True)
class GrpcAnswer:
    """What one call came back with."""

    #: The version that answered (None on failure).
    version: str | None
    #: ``"<HTTP status> <code>: <message>"`` on failure, else None.
    error: str | None
    #: Bytes of the response message.
    size: int
    #: Seconds from send to answer.
    seconds: float
    #: The HTTP status the answer stands for (200; 0 for a gRPC code without one).
    status: int = 200


def _version(response: bytes) -> str | None:
    version: str = _pb().ModelInferResponse.FromString(response).model_version
    return version or None


def _failure(error: grpc.RpcError, started: float) -> GrpcAnswer:
    code: grpc.StatusCode = error.code()
    details = " ".join(str(error.details() or "").split())
    if len(details) > 160:  # as long as an HTTP error's message may be in a report
        details = details[:157] + "..."
    status = HTTP_STATUS.get(code, 0)
    error_text = f"{status} {code.name}: {details}"
    return GrpcAnswer(None, error_text, 0, time.perf_counter() - started, status)


class GrpcInfer:
    """A blocking V2 gRPC client for pre-serialized ``ModelInferRequest`` messages."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._infer: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(
            MODEL_INFER
        )

    def __call__(
        self, request: bytes, metadata: tuple[tuple[str, str], ...] = (), timeout_s: float = 60.0
    ) -> GrpcAnswer:
        """Send ``request`` and wait for its answer (never raises for a gRPC error)."""
        started = time.perf_counter()
        try:
            response: bytes = self._infer(request, metadata=metadata, timeout=timeout_s)
        except grpc.RpcError as e:
            return _failure(e, started)
        return GrpcAnswer(_version(response), None, len(response), time.perf_counter() - started)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


class AsyncGrpcInfer:
    """The asyncio twin of ``GrpcInfer`` (one channel, any number of calls in flight)."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(
            MODEL_INFER
        )

    async def __call__(
        self, request: bytes, metadata: tuple[tuple[str, str], ...] = (), timeout_s: float = 60.0
    ) -> GrpcAnswer:
        """Send ``request`` and await its answer (never raises for a gRPC error)."""
        started = time.perf_counter()
        try:
            response: bytes = await self._infer(request, metadata=metadata, timeout=timeout_s)
        except grpc.RpcError as e:
            return _failure(e, started)
        return GrpcAnswer(_version(response), None, len(response), time.perf_counter() - started)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()
