"""Real models for the A/B tests: one classifier ``clf`` in four published versions.

Input ``x`` FP32 [N, 4], output ``logits`` FP32 [N, 3]:

- version 1 (baseline): ``x @ W1``
- version 2 (healthy candidate): ``x @ W2`` with ``W2 = W1 + DELTA``
- version 3 (faulty): ``x @ W1``, but the run fails (an out-of-range Gather) for any
  batch holding a row with ``x[:, 0] >= 4``
- version 4 (slow): ``x @ W1`` after a loop of ``1000 * max(x[:, 3])`` iterations
  (about a second for ``x[:, 3] = 200`` on this machine)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from model_store.store import ModelStore
from serving.config import FermionConfig
from serving.inference.backends.local import LocalBackend
from serving.inference.repository import ModelRepository

__all__ = [
    "DELTA",
    "FAIL_AT",
    "MODEL",
    "SLOW_ITERATIONS_PER_UNIT",
    "W1",
    "W2",
    "build_ab_store",
    "expected_logits",
    "serve_in_process",
    "step_verdicts",
    "v2_body",
]

MODEL = "clf"
W1 = np.array(
    [[1.0, 0.5, -0.5], [0.2, 1.0, 0.1], [-0.3, 0.4, 1.0], [0.05, -0.05, 0.02]], dtype=np.float32
)
DELTA = np.array(
    [[0.0, 0.3, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.25], [0.0, 0.0, 0.0]], dtype=np.float32
)
W2 = W1 + DELTA
#: Version 3 fails on batches with a row whose x[:, 0] is at least this.
FAIL_AT = 4.0
#: Version 4 loops this many times per unit of max(x[:, 3]).
SLOW_ITERATIONS_PER_UNIT = 1000.0


def expected_logits(version: int, x: np.ndarray) -> np.ndarray:
    """What version ``version`` answers for ``x`` (when it answers)."""
    weights = W2 if version == 2 else W1
    out: np.ndarray = x.astype(np.float32) @ weights
    return out


def step_verdicts(history: list[dict[str, Any]]) -> list[str]:
    """The verdict of each judged step of a rollout's ``history``, holds left out.

    A hold is a p99 breach the controller judges again (``p99_breaches``): a stall of this
    busy host can breach one interval of a healthy candidate. Any other hold is an error.
    """
    holds = [h for h in history if h["verdict"] == "hold"]
    assert all(h["reason"].startswith("p99 latency") for h in holds), holds
    return [h["verdict"] for h in history if h["verdict"] != "hold"]


def v2_body(rows: int = 1, **parameters: Any) -> dict[str, Any]:
    """A V2 JSON body of ``rows`` zero rows for ``clf`` (any version answers it at once)."""
    body: dict[str, Any] = {
        "inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": [0.0] * 4 * rows}]
    }
    if parameters:
        body["parameters"] = parameters
    return body


def _const(name: str, value: np.ndarray | np.generic, dtype: int) -> onnx.TensorProto:
    arr = np.asarray(value)
    return helper.make_tensor(name, dtype, list(arr.shape), arr.ravel().tolist())


def _save(path: Path, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> None:
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _matmul(path: Path, weights: np.ndarray) -> None:
    _save(
        path,
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        [_const("w", weights, TensorProto.FLOAT)],
    )


def _faulty(path: Path) -> None:
    # index = int(x[:, 0]) into a table of FAIL_AT zeros: out of range -> the run fails.
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Gather", ["x", "col0"], ["first"], axis=1),
        helper.make_node("Cast", ["first"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["zero"], axis=0),
        helper.make_node("Unsqueeze", ["zero", "axis1"], ["zero2"]),
        helper.make_node("Add", ["y", "zero2"], ["logits"]),
    ]
    inits = [
        _const("w", W1, TensorProto.FLOAT),
        _const("col0", np.int64(0), TensorProto.INT64),
        _const("table", np.zeros(int(FAIL_AT), np.float32), TensorProto.FLOAT),
        _const("axis1", np.array([1], np.int64), TensorProto.INT64),
    ]
    _save(path, nodes, inits)


def _slow(path: Path) -> None:
    body = helper.make_graph(
        [
            helper.make_node("Mul", ["c_in", "half"], ["m"]),
            helper.make_node("Add", ["m", "one"], ["c_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("c_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("c_out", TensorProto.FLOAT, []),
        ],
        initializer=[
            _const("half", np.float32(0.5), TensorProto.FLOAT),
            _const("one", np.float32(1.0), TensorProto.FLOAT),
        ],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Gather", ["x", "col3"], ["speed"], axis=1),
        helper.make_node("ReduceMax", ["speed"], ["top"], keepdims=0),
        helper.make_node("Mul", ["top", "per_unit"], ["trips_f"]),
        helper.make_node("Cast", ["trips_f"], ["trips"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["x"], ["seed"], keepdims=0),
        helper.make_node("Loop", ["trips", "go", "seed"], ["spun"], body=body),
        helper.make_node("Mul", ["spun", "nothing"], ["zero"]),
        helper.make_node("Add", ["y", "zero"], ["logits"]),
    ]
    inits = [
        _const("w", W1, TensorProto.FLOAT),
        _const("col3", np.int64(3), TensorProto.INT64),
        _const("per_unit", np.float32(SLOW_ITERATIONS_PER_UNIT), TensorProto.FLOAT),
        _const("go", np.bool_(True), TensorProto.BOOL),
        _const("nothing", np.float32(0.0), TensorProto.FLOAT),
    ]
    _save(path, nodes, inits)


def build_ab_store(root: Path) -> ModelStore:
    """Publish versions 1-4 of ``clf`` into a store at ``root`` (once: reused if there)."""
    store = ModelStore(root)
    if store.versions(MODEL) if MODEL in store.models() else []:
        return store
    from compilers.pipeline import build_model

    work = root.parent / f"{root.name}-onnx"
    work.mkdir(parents=True, exist_ok=True)
    makers = [
        lambda p: _matmul(p, W1),
        lambda p: _matmul(p, W2),
        _faulty,
        _slow,
    ]
    samples = np.random.default_rng(0).random((8, 4)).astype(np.float32)
    for i, make in enumerate(makers, start=1):
        path = work / f"clf-v{i}.onnx"
        make(path)
        build_model(store, MODEL, onnx_path=path, samples=samples, max_batch_size=64)
    return store


@contextlib.asynccontextmanager
async def serve_in_process(store: ModelStore, **settings: Any) -> AsyncIterator[ModelRepository]:
    """Every version of ``clf`` loaded in this process on the local backend (no server).

    ``settings`` are further top-level config keys (``batching={...}``).
    """
    config = FermionConfig.model_validate({"store": {"root": str(store.root)}, **settings})
    backend = LocalBackend(config, store)
    await backend.start()
    repository = ModelRepository(config, store, backend)
    await repository.start()
    try:
        yield repository
    finally:
        await repository.stop()
        await backend.stop()
