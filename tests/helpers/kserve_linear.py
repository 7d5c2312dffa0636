"""KServe's own Python V2 server (``kserve.ModelServer``) with a small linear model.

Run by the remote backend's tests in a virtual environment of its own (see
``bench/competitors.py``): it imports nothing from Fermion. ``y = x @ W`` with W
the same as ``tests/helpers/remote_models.WEIGHTS``; a negative input is refused
with KServe's ``InvalidInput`` (400) and a row of 999s fails the model (500).
Outputs go back as binary data when the request asks for it, else as JSON.

    .bench-venvs/kserve/bin/python tests/helpers/kserve_linear.py --port 8002
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np
import uvicorn
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.errors import InvalidInput

WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10.0


class LinearModel(Model):  # type: ignore[misc]
    """``y = x @ WEIGHTS`` for x FP32 [N, 4]."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.ready = True

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]

    def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        if (x < 0).any():
            raise InvalidInput("x must not be negative")
        if (x == 999).all(axis=1).any():
            raise RuntimeError("the model cannot compute a row of 999s")
        wanted = {o.name: o.binary_data for o in payload.request_outputs or []}
        output = InferOutput(name="y", shape=[x.shape[0], 3], datatype="FP32")
        output.set_data_from_numpy(x @ WEIGHTS, binary_data=bool(wanted.get("y")))
        return InferResponse(
            response_id=payload.id or "", model_name=self.name, infer_outputs=[output]
        )


class _LoopbackConfig(uvicorn.Config):
    """uvicorn's config, bound to 127.0.0.1 whatever host KServe asks for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["host"] = "127.0.0.1"
        super().__init__(*args, **kwargs)


def main() -> None:
    """Serve the model as ``linear`` on ``--port`` until stopped."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.Config = _LoopbackConfig  # type: ignore[misc]
    server = ModelServer(
        http_port=args.port,
        grpc_port=args.grpc_port,
        workers=1,
        enable_grpc=False,
        enable_latency_logging=False,
    )
    for name in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(name).disabled = True
    server.start([LinearModel("linear")])


if __name__ == "__main__":
    main()
