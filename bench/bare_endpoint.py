"""The competitor: a bare Starlette endpoint that runs ONNX Runtime in the handler.

What a competent engineer writes in twenty lines: parse the V2 JSON body with the
standard library, call the session once per request (no batching, no threads),
answer V2 JSON. Served by the same stack as Fermion: uvicorn, uvloop, httptools,
one worker, no access log.

    python -m bench.bare_endpoint --store model_store --model digits --port 8001
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench._store import find_model_version

__all__ = ["create_app", "main"]


def create_app(onnx_path: Path) -> Starlette:
    """A Starlette app serving ``POST /v2/models/{name}/infer`` from one ORT session."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]

    async def infer(request: Request) -> Response:
        body = json.loads(await request.body())
        feeds = {
            t["name"]: np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
            for t in body["inputs"]
        }
        results = session.run(output_names, feeds)
        outputs = [
            {"name": n, "datatype": "FP32", "shape": list(r.shape), "data": r.ravel().tolist()}
            for n, r in zip(output_names, results, strict=True)
        ]
        answer = {"model_name": request.path_params["name"], "outputs": outputs}
        return Response(json.dumps(answer), media_type="application/json")

    async def ready(request: Request) -> Response:
        return Response(status_code=200)

    return Starlette(
        routes=[
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
            Route("/v2/health/ready", ready, methods=["GET"]),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """Serve the bare endpoint on the ONNX Runtime artifact of a store's model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--model", default="digits")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    app = create_app(find_model_version(args.store, args.model).onnx_path)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
