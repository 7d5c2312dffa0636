"""The cluster competitor: plain Ray Serve, one deployment with ``@serve.batch``.

What the Ray Serve docs lead to: one deployment serving the V2 JSON route
behind Serve's own HTTP proxy, ``@serve.batch(max_batch_size=64)`` around one
ONNX Runtime session (1 intra-op thread, the same artifact Fermion serves), and
``max_ongoing_requests`` raised above the batch size (the default of 5 would
starve the batcher). A local cluster on loopback, stopped on SIGTERM.

    python -m bench.ray_serve_plain --store model_store --model digits --port 8002
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _app(onnx_path: Path, model: str, batch_wait_s: float) -> Any:
    import numpy as np
    import onnxruntime as ort
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 1})
    class PlainV2:
        def __init__(self) -> None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            self.session = ort.InferenceSession(
                str(onnx_path), options, providers=["CPUExecutionProvider"]
            )
            self.input = self.session.get_inputs()[0].name
            self.outputs = [o.name for o in self.session.get_outputs()]

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=batch_wait_s)
        async def predict(self, xs: list[Any]) -> list[Any]:
            rows = [len(x) for x in xs]
            logits = self.session.run(self.outputs, {self.input: np.concatenate(xs)})[0]
            return list(np.split(logits, np.cumsum(rows)[:-1]))

        async def __call__(self, request: Request) -> Response:
            if request.method == "GET":
                return Response(status_code=200)
            body = json.loads(await request.body())
            t = body["inputs"][0]
            x = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
            y = await self.predict(x)
            out = {"name": self.outputs[0], "datatype": "FP32", "shape": list(y.shape)}
            out["data"] = y.ravel().tolist()
            answer = {"model_name": model, "outputs": [out]}
            return Response(json.dumps(answer), media_type="application/json")

    return PlainV2.bind()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    """Start a local Ray cluster and serve the model through Serve's HTTP proxy."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--model", default="digits")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="serve.batch wait (Serve's default 10)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from bench._store import find_model_version

    version = find_model_version(args.store, args.model)
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(_app(version.onnx_path, args.model, args.batch_wait_ms / 1000), route_prefix="/")
    print(f"plain Ray Serve up on 127.0.0.1:{args.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    ray.shutdown()


if __name__ == "__main__":
    main()
