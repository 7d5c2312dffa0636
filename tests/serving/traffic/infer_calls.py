"""Send a tensor through the real inference service, as a transport would, and read the answer."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import orjson

from serving.config import LimitsConfig
from serving.inference.codec import HttpInferBody
from serving.inference.limits import RequestLimits
from serving.inference.repository import ModelRepository
from serving.inference.service import InferCall, InferenceService
from serving.traffic.route_table import RouteTable
from tests.helpers.ab_models import MODEL

__all__ = ["infer", "service"]


def service(table: RouteTable, repository: ModelRepository) -> InferenceService[Any]:
    """The gateway's inference service over ``table`` and ``repository``."""
    limits = RequestLimits(LimitsConfig())
    return InferenceService(repository, limits, routes=table, max_body_bytes=64 * 1024 * 1024)


async def infer(
    svc: InferenceService[Any],
    x: np.ndarray,
    headers: dict[str, str] | None = None,
    state: dict[str, object] | None = None,
) -> dict[str, np.ndarray]:
    """The outputs for ``x`` sent as a V2 JSON request to the routed model.

    ``state``, when given, is the call's state: ``served`` names the version that took the
    request, also when it failed.
    """
    body = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "data": x.ravel().tolist(),
                }
            ]
        }
    )

    async def read_body() -> bytes:
        return body

    headers = headers or {}
    call = InferCall(
        MODEL,
        None,
        headers,
        HttpInferBody(read_body, headers, 1 << 20),
        time.perf_counter_ns(),
        {} if state is None else state,
    )
    content, _ = await svc.infer(call)
    answer = orjson.loads(content)
    return {
        o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in answer["outputs"]
    }
