"""A competitor: KServe's Python model server running the same ONNX model.

This is KServe's own custom-predictor path, the one its sklearn and xgboost servers
take: a ``kserve.Model`` whose ``predict`` runs one ONNX Runtime session (one
intra-op thread, as the bare endpoint), served by ``kserve.ModelServer`` on the V2
REST protocol (``POST /v2/models/{name}/infer``, the body Fermion takes). Its
per-request log lines (its timing middleware's ``kserve.trace`` lines, its latency
log, uvicorn's access log) are off, as on the other servers; the middleware itself
stays, as KServe ships it. It is bound to loopback (KServe hard-codes 0.0.0.0).
KServe batches only in its Go agent sidecar, which is not part of the Python server.

It runs in a virtual environment of its own (``bench/competitors.py`` makes it):
KServe pins fastapi, uvicorn and pydantic versions that Fermion's need not share.
So this file imports nothing from Fermion.

    .bench-venvs/kserve/bin/python bench/kserve_endpoint.py --onnx M.onnx --model digits \
        --port 8002
"""

from __future__ import annotations

import argparse
import logging
import socket
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

__all__ = ["OnnxModel", "main"]


class OnnxModel(Model):  # type: ignore[misc]
    """One ONNX Runtime session behind KServe's V2 data plane."""

    def __init__(self, name: str, onnx_path: str) -> None:
        super().__init__(name)
        self._path = onnx_path
        self._session: ort.InferenceSession | None = None
        self._outputs: list[str] = []
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            self._path, options, providers=["CPUExecutionProvider"]
        )
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.ready = True
        return True

    def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        assert self._session is not None
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        outputs = []
        for name, result in zip(self._outputs, results, strict=True):
            array = np.asarray(result)
            output = InferOutput(name=name, shape=list(array.shape), datatype="FP32")
            output.set_data_from_numpy(array, binary_data=False)
            outputs.append(output)
        return InferResponse(
            response_id=payload.id or "", model_name=self.name, infer_outputs=outputs
        )


class _LoopbackConfig(uvicorn.Config):
    """uvicorn's config, bound to 127.0.0.1 whatever host KServe asks for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["host"] = "127.0.0.1"
        super().__init__(*args, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    """Serve ``--onnx`` as ``--model`` on ``--port`` until stopped."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--onnx", required=True, help="the ONNX model file")
    parser.add_argument("--model", required=True, help="the name it is served under")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.Config = _LoopbackConfig  # type: ignore[misc]
    model = OnnxModel(args.model, args.onnx)
    server = ModelServer(
        http_port=args.port,
        grpc_port=_free_port(),
        workers=1,
        enable_grpc=False,
        enable_latency_logging=False,
    )
    for name in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(name).disabled = True
    server.start([model])


if __name__ == "__main__":
    main()
