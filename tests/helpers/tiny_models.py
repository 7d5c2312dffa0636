"""Small torch modules for the compile tests, importable as module specs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

__all__ = ["TwoHeaded", "tiny_mlp", "two_headed", "write_matmul_onnx"]


def tiny_mlp() -> nn.Module:
    """A seeded 4 -> 8 -> 3 MLP: input FP32 [N, 4], output FP32 [N, 3]."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


class TwoHeaded(nn.Module):
    """Two inputs (FP32 [N, 4] features, INT64 [N, 2] ids) and two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(
        self, features: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [N, 3] and a sum [N, 1]."""
        hidden = features + self.embed(ids).sum(dim=1)
        return self.head(hidden), hidden.sum(dim=1, keepdim=True)


def two_headed() -> nn.Module:
    """A seeded ``TwoHeaded``."""
    torch.manual_seed(0)
    return TwoHeaded()


def write_matmul_onnx(path: Path, batch: str | int = "n") -> None:
    """Write a hand-made ONNX graph ``y = x @ w``: x FP32 [batch, 3], y FP32 [batch, 2].

    Like old exporters, it lists the weight ``w`` among the graph inputs too.
    """
    weight = helper.make_tensor("w", TensorProto.FLOAT, [3, 2], np.arange(6, dtype=np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
