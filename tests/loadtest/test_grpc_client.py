"""The load test's gRPC requests: built once from the metadata, every input raw."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from loadtest.grpc_client import MODEL_INFER, encode_requests, grpc_address
from loadtest.grpc_transport import GrpcTransport
from loadtest.payloads import HEADER_LENGTH, build_payloads, build_tensors
from loadtest.transport import Call, TransportOptions

METADATA = {
    "name": "m",
    "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "s", "datatype": "BYTES", "shape": [-1, 1]},
    ],
}


def test_requests_carry_every_input_raw() -> None:
    tensors = build_tensors(METADATA, batch_size=2, count=3)
    requests = encode_requests(tensors, "m", "2")
    assert len(requests) == 3
    for raw, inputs in zip(requests, tensors, strict=True):
        request = pb.ModelInferRequest.FromString(raw)
        assert (request.model_name, request.model_version) == ("m", "2")
        assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
            ("x", "FP32", [2, 3]),
            ("s", "BYTES", [2, 1]),
        ]
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(2, 3)
        assert np.array_equal(x, inputs[0][1])
        words = [w for w in inputs[1][1].reshape(-1)]
        assert request.raw_input_contents[1] == b"".join(
            struct.pack("<I", len(w)) + w for w in words
        )


def test_an_unpinned_request_names_no_version() -> None:
    (raw,) = encode_requests(build_tensors(METADATA, count=1), "m")
    assert pb.ModelInferRequest.FromString(raw).model_version == ""


def test_grpc_address_takes_either_spelling() -> None:
    assert grpc_address("grpc://127.0.0.1:8001") == "127.0.0.1:8001"
    assert grpc_address("127.0.0.1:8001") == "127.0.0.1:8001"


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "grpc://", "127.0.0.1:8001/v2"])
def test_an_address_that_is_not_grpc_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="invalid gRPC address"):
        grpc_address(url)


def test_open_loop_grpc_calls_carry_the_inputs_of_the_http_bodies() -> None:
    payloads = build_payloads(METADATA, binary=True, batch_size=2, count=3)

    async def calls() -> list[Call]:
        transport = GrpcTransport(TransportOptions(["grpc://127.0.0.1:8001"]))
        try:
            return transport.calls("m", "2", payloads)
        finally:
            await transport.aclose()

    built = asyncio.run(calls())
    assert len(built) == 3
    for call, payload in zip(built, payloads, strict=True):
        assert call.path == MODEL_INFER
        request = pb.ModelInferRequest.FromString(call.body)
        assert (request.model_name, request.model_version) == ("m", "2")
        raw = payload.body[int(payload.headers[HEADER_LENGTH]) :]
        assert b"".join(request.raw_input_contents) == raw
