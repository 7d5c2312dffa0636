"""The HTTP bad-input suite (test_bad_input.py) over gRPC: each bad request gets its status
and a message naming what is wrong, and the server stays healthy and right.

HTTP's invalid-JSON, non-numeric-data and missing-Content-Type cases have no gRPC twin:
protobuf types the message, and gRPC parses it before Fermion sees it.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.e2e.conftest import MAX_BODY_BYTES
from tests.helpers.servers import RunningServer

pytestmark = pytest.mark.e2e

ROW = np.linspace(0, 1, 784, dtype=np.float32)
C = grpc.StatusCode


@pytest.fixture()
def stub(grpc_server: RunningServer) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    assert grpc_server.grpc_address is not None
    with grpc.insecure_channel(grpc_server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        yield stub
        # Whatever was sent, the server is still healthy and still right.
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        ok = stub.ModelInfer(_request())
        assert np.frombuffer(ok.raw_output_contents[0], np.float32).shape == (10,)


def _request(
    *,
    name: str = "input",
    datatype: str = "FP32",
    shape: tuple[int, ...] = (1, 1, 28, 28),
    raw: list[bytes] | None = None,
    model: str = "digits",
    version: str = "",
    outputs: tuple[str, ...] = (),
) -> Any:
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    return pb.ModelInferRequest(
        model_name=model,
        model_version=version,
        inputs=[tensor],
        raw_input_contents=[ROW.tobytes()] if raw is None else raw,
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
    )


def _typed(values: list[float], field: str = "fp32_contents") -> Any:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=[1, 1, 28, 28]
    )
    getattr(tensor.contents, field).extend(values)
    return pb.ModelInferRequest(model_name="digits", inputs=[tensor])


def _expect(stub: Any, request: Any, code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request, timeout=30)
    error = raised.value
    assert error.code() is code, error.details()
    details = error.details() or ""
    for fragment in fragments:
        assert fragment.lower() in details.lower(), details


def test_wrong_datatype(stub: Any) -> None:
    _expect(stub, _request(datatype="INT32"), C.INVALID_ARGUMENT, "input", "datatype", "INT32")


def test_wrong_shape(stub: Any) -> None:
    _expect(stub, _request(shape=(1, 784)), C.INVALID_ARGUMENT, "input", "shape", "[1, 784]")
    _expect(stub, _request(shape=(1, 1, 28, 27)), C.INVALID_ARGUMENT, "shape")


def test_data_length_not_matching_shape(stub: Any) -> None:
    _expect(stub, _typed(ROW.tolist()[:-1]), C.INVALID_ARGUMENT, "contents has 783 elements")
    # Values in another datatype's field leave the FP32 field empty.
    _expect(stub, _typed([1] * 784, "int_contents"), C.INVALID_ARGUMENT, "has 0 elements")


def test_truncated_raw_contents(stub: Any) -> None:
    cut = _request(raw=[ROW.tobytes()[:-100]])
    _expect(stub, cut, C.INVALID_ARGUMENT, "raw_input_contents is 3036", "needs 3136 bytes")


def test_raw_contents_not_matching_the_inputs(stub: Any) -> None:
    two = _request(raw=[ROW.tobytes(), ROW.tobytes()])
    _expect(stub, two, C.INVALID_ARGUMENT, "raw_input_contents has 2 entries for 1 inputs")


def test_unknown_input_and_output_names(stub: Any) -> None:
    _expect(stub, _request(name="pixels"), C.INVALID_ARGUMENT, "unknown input 'pixels'")
    unknown = _request(outputs=("probabilities",))
    _expect(stub, unknown, C.INVALID_ARGUMENT, "unknown output 'probabilities'")


def test_unknown_model_and_version(stub: Any) -> None:
    _expect(stub, _request(model="nosuch"), C.NOT_FOUND, "unknown model 'nosuch'")
    _expect(stub, _request(version="99"), C.NOT_FOUND, "unknown version '99'")
    _expect(stub, _request(version="abc"), C.NOT_FOUND, "abc")
    _expect(stub, _request(model="../../etc"), C.NOT_FOUND)
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nosuch"))
    assert raised.value.code() is C.NOT_FOUND


def test_message_over_the_limit(stub: Any) -> None:
    big = _request(raw=[b"\0" * (MAX_BODY_BYTES + 1)])
    _expect(stub, big, C.RESOURCE_EXHAUSTED)


def test_compressed_message_inflating_over_the_limit(stub: Any) -> None:
    """gRPC's own gzip: the limit applies to the inflated message (no bomb gets through)."""
    big = _request(raw=[b"\0" * (MAX_BODY_BYTES * 4)])
    assert len(gzip.compress(big.SerializeToString())) < MAX_BODY_BYTES // 10
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(big, timeout=30, compression=grpc.Compression.Gzip)
    assert raised.value.code() is C.RESOURCE_EXHAUSTED, raised.value.details()


def test_batch_over_max_batch_size(stub: Any) -> None:
    rows = 65
    raw = [np.zeros((rows, 784), np.float32).tobytes()]
    over = _request(shape=(rows, 1, 28, 28), raw=raw)
    _expect(stub, over, C.INVALID_ARGUMENT, "batch of 65", "64")


def test_a_compressed_request_works(stub: Any) -> None:
    response = stub.ModelInfer(_request(), compression=grpc.Compression.Gzip)
    assert len(response.raw_output_contents) == 1
