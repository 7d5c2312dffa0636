"""One store per test session with the demo CNN built for ``onnxruntime`` and ``torch`` (CPU).

An AOTInductor CPU compile takes 20-30 s, so the build runs once per session and is
shared by the compile and end-to-end tests that ask for it. The store also holds
``digits-gpu``, a version whose only artifacts are for GPUs no host has (compute
capability 1.0), to show what a host with no fitting artifact does.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model_store.manifest import ModelManifest
from model_store.store import ArtifactSource, ModelStore

__all__ = ["GPU_ONLY", "MODEL", "TorchStore", "torch_store"]

#: The model built for onnxruntime and torch.
MODEL = "digits"
#: The model whose artifacts fit no host.
GPU_ONLY = "digits-gpu"


@dataclass(frozen=True)
class TorchStore:
    """The store, the built manifest, its module and the images it was checked on."""

    store: ModelStore
    manifest: ModelManifest
    module: nn.Module
    images: np.ndarray


def _publish_gpu_only(store: ModelStore, source: ModelManifest, work: Path) -> None:
    # Placeholder bytes: selection turns these artifacts down from their options alone.
    blob = work / "never-loaded.bin"
    blob.write_bytes(hashlib.sha256(b"fermion").digest())
    store.publish(
        GPU_ONLY,
        platform=source.platform,
        inputs=source.inputs,
        outputs=source.outputs,
        max_batch_size=source.max_batch_size,
        artifacts=[
            ArtifactSource(
                target="tensorrt",
                path=blob,
                file="model.sm10-trt10.0.0-fp16.plan",
                options={
                    "device": "cuda",
                    "precision": "fp16",
                    "compute_capability": "1.0",
                    "tensorrt_version": "10.0.0",
                },
            ),
            ArtifactSource(
                target="torch",
                path=blob,
                file="model.torch-cuda-fp16.pt2",
                options={
                    "device": "cuda",
                    "precision": "fp16",
                    "compute_capability": "1.0",
                    "torch_version": torch.__version__,
                },
            ),
        ],
    )


@functools.cache
def _build(root: Path) -> TorchStore:
    from compilers.demo import INPUTS, digits_cnn, load_digits_28
    from compilers.pipeline import build_model

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = digits_cnn().eval()
    images = load_digits_28().x_test[:64]
    store = ModelStore(root / "store")
    manifest = build_model(
        store,
        MODEL,
        module=module,
        inputs=INPUTS,
        output_names=["logits"],
        targets=["onnxruntime", "torch"],
        max_batch_size=64,
        samples=images,
    )
    _publish_gpu_only(store, manifest, root)
    return TorchStore(store=store, manifest=manifest, module=module, images=images)


def torch_store(factory: pytest.TempPathFactory) -> TorchStore:
    """The session's torch store, built on first use."""
    return _build(factory.getbasetemp() / "torch-store")
