"""Where a server's time goes per request, from a py-spy ``--gil --format raw`` profile.

Each line of the profile is a stack (``func (file:line);...``, outermost first) and how
many samples caught it; with ``--gil`` a sample is taken only from the thread holding
the GIL, so the samples add up to the Python-side CPU of the server. A step's time is
the samples whose stack passes through it (inclusive), turned into microseconds per
request with the sampling rate, the profile's length and the requests answered
meanwhile. Samples whose innermost Python frame is the event loop's ``run`` are time in
compiled code the loop called (grpcio's Cython server, uvloop, httptools), outside any
Python function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

__all__ = ["STEPS", "summarize_profile"]

#: (label, a piece of the frame that marks the step): the steps of one request.
STEPS: Final = (
    ("gRPC handler (gate + servicer)", "ModelInfer (serving/grpc/servicer.py"),
    ("  auth, rate limit, metadata", "_admit (serving/grpc/gate.py"),
    ("  decode ModelInferRequest", "decode (serving/grpc/body.py"),
    ("  encode ModelInferResponse", "encode (serving/grpc/body.py"),
    ("HTTP infer path", "serving/http/infer_path.py"),
    ("  decode V2 body", "decode (serving/inference/codec.py"),
    ("  encode V2 answer", "encode (serving/inference/codec.py"),
    ("HTTP middleware + uvicorn", "httptools_impl.py"),
    ("inference service (route, submit, record)", "infer (serving/inference/service.py"),
    ("batcher: dispatch and gather", "serving/inference/batcher.py"),
    ("executor (ONNX Runtime run)", "serving/inference/executors/onnxruntime.py"),
    ("grpc.aio Python code", "grpc/aio/"),
)
#: Innermost frames that mean: in compiled code called by the event loop.
_LOOP_LEAVES: Final = ("Runner.run (", "run_until_complete (", "asyncio_run (")


def summarize_profile(
    path: Path, *, rate_hz: float, seconds: float, rps: float, top: int = 12
) -> dict[str, Any]:
    """Per-step time per request, and the functions with the most samples of their own."""
    stacks: list[tuple[str, int]] = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack, int(count)))
    total = sum(n for _, n in stacks)
    requests = max(rps * seconds, 1.0)

    def per_request(samples: int) -> float:
        return samples / rate_hz / requests * 1e6

    steps = []
    for label, marker in STEPS:
        samples = sum(n for s, n in stacks if marker in s)
        if samples:
            steps.append(
                {
                    "what": label,
                    "share": round(samples / total, 3) if total else 0.0,
                    "us_per_request": round(per_request(samples), 1),
                }
            )
    in_loop = sum(n for s, n in stacks if s.rsplit(";", 1)[-1].startswith(_LOOP_LEAVES))
    if in_loop:
        steps.append(
            {
                "what": "compiled code under the event loop (grpc Cython, uvloop, httptools)",
                "share": round(in_loop / total, 3),
                "us_per_request": round(per_request(in_loop), 1),
            }
        )
    own: dict[str, int] = {}
    for stack, n in stacks:
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf] = own.get(leaf, 0) + n
    leaves = sorted(own.items(), key=lambda kv: -kv[1])[:top]
    return {
        "samples": total,
        "busy_us_per_request": round(per_request(total), 1),
        "top": steps,
        "self": [
            {
                "what": leaf,
                "share": round(n / total, 3),
                "us_per_request": round(per_request(n), 1),
            }
            for leaf, n in leaves
        ],
    }
