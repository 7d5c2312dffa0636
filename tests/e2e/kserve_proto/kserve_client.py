"""A client generated from KServe's proto: ``python -m tests.e2e.kserve_proto.kserve_client
ADDRESS``. Prints one JSON object with what each RPC answered.

It runs in a process of its own: KServe's messages are ``inference.*`` like Triton's, and
one process's protobuf pool cannot hold both definitions.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_tools import protoc

_PROTO = Path(__file__).with_name("grpc_predict_v2.proto")


def _stubs(out: Path) -> tuple[Any, Any]:
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{_PROTO.parent}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            _PROTO.name,
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed with {code}")
    sys.path.insert(0, str(out))
    return (
        importlib.import_module("grpc_predict_v2_pb2"),
        importlib.import_module("grpc_predict_v2_pb2_grpc"),
    )


def main(address: str) -> dict[str, Any]:
    """Every RPC of KServe's service against ``address``."""
    with tempfile.TemporaryDirectory() as tmp:
        pb, pb_grpc = _stubs(Path(tmp))
    x = np.linspace(0, 1, 2 * 784, dtype=np.float32).reshape(2, 1, 28, 28)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
        server = stub.ServerMetadata(pb.ServerMetadataRequest())
        raw = stub.ModelInfer(
            pb.ModelInferRequest(
                model_name="digits",
                id="k-1",
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(
                        name="input", datatype="FP32", shape=list(x.shape)
                    )
                ],
                raw_input_contents=[x.tobytes()],
            )
        )
        typed_input = pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=list(x.shape)
        )
        typed_input.contents.fp32_contents.extend(x.ravel().tolist())
        typed = stub.ModelInfer(pb.ModelInferRequest(model_name="digits", inputs=[typed_input]))
        try:
            stub.ModelReady(pb.ModelReadyRequest(name="nosuch"))
            missing = "OK"
        except grpc.RpcError as e:
            missing = e.code().name
        return {
            "live": stub.ServerLive(pb.ServerLiveRequest()).live,
            "ready": stub.ServerReady(pb.ServerReadyRequest()).ready,
            "model_ready": stub.ModelReady(pb.ModelReadyRequest(name="digits")).ready,
            "missing_model": missing,
            "server": server.name,
            "versions": list(meta.versions),
            "inputs": [(t.name, t.datatype, list(t.shape)) for t in meta.inputs],
            "id": raw.id,
            "model_version": raw.model_version,
            "outputs": [(o.name, o.datatype, list(o.shape)) for o in raw.outputs],
            "raw_logits": np.frombuffer(raw.raw_output_contents[0], np.float32).tolist(),
            "typed_logits": np.frombuffer(typed.raw_output_contents[0], np.float32).tolist(),
            "input": x.ravel().tolist(),
        }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
