"""Small ONNX models published into a store, for the remote backend's tests (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from model_store.manifest import ModelManifest, TensorSpec
from model_store.store import ArtifactSource, ModelStore

__all__ = ["WEIGHTS", "expected", "publish_linear"]

#: y = x @ WEIGHTS: x FP32 [N, 4] -> y FP32 [N, 3].
WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10.0


def expected(x: np.ndarray) -> np.ndarray:
    """What every variant of the linear model answers for ``x``."""
    out: np.ndarray = x.astype(np.float32) @ WEIGHTS
    return out


def _graph(slow: int) -> onnx.ModelProto:
    """``y = x @ WEIGHTS``; with ``slow`` > 0, plus zero times a [slow, slow] matmul per batch."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y0" if slow else "y"])]
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], WEIGHTS.reshape(-1))]
    if slow:
        inits += [
            helper.make_tensor("side", TensorProto.INT64, [2], [slow, slow]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        ]
        nodes += [
            # A [slow, slow] matrix that depends on the input, so it is computed every batch.
            helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
            helper.make_node("Sigmoid", ["m"], ["s"]),
            helper.make_node("Expand", ["s", "side"], ["a"]),
            helper.make_node("MatMul", ["a", "a"], ["aa"]),
            helper.make_node("ReduceMean", ["aa"], ["busy"], keepdims=0),
            helper.make_node("Mul", ["busy", "zero"], ["nothing"]),
            helper.make_node("Add", ["y0", "nothing"], ["y"]),
        ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def publish_linear(
    store: ModelStore, work: Path, name: str = "linear", *, slow: int = 0, max_batch_size: int = 64
) -> ModelManifest:
    """Publish the linear model as a new version of ``name``; ``slow`` makes each batch slower."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{name}-{slow}.onnx"
    onnx.save(_graph(slow), str(path))
    return store.publish(
        name,
        platform="onnxruntime_onnx",
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 3])],
        max_batch_size=max_batch_size,
        artifacts=[ArtifactSource(target="onnxruntime", path=path, file="model.onnx")],
    )
