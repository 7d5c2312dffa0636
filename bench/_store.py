"""Find a published model version, its ONNX Runtime artifact and its sample inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["ModelVersion", "find_model_version", "load_samples"]

_LABEL_KEYS = ("label", "labels", "target", "targets", "y")


@dataclass(frozen=True)
class ModelVersion:
    """One published version of a model, as the benchmark needs it."""

    name: str
    version: int
    directory: Path
    onnx_path: Path
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str


def find_model_version(store: Path, model: str) -> ModelVersion:
    """The latest version of ``model`` in ``store`` that has an ``onnxruntime`` artifact."""
    root = store / model
    if not root.is_dir():
        raise FileNotFoundError(f"no model {model!r} in store {store}")
    versions = sorted(
        (int(p.name), p)
        for p in root.iterdir()
        if p.name.isdigit() and (p / "manifest.json").is_file()
    )
    if not versions:
        raise FileNotFoundError(f"model {model!r} in {store} has no published version")
    version, directory = versions[-1]
    manifest: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
    artifact = next(
        (a for a in manifest.get("artifacts", []) if a.get("target") == "onnxruntime"), None
    )
    if artifact is None:
        raise FileNotFoundError(f"{directory}/manifest.json lists no onnxruntime artifact")
    inputs = manifest.get("inputs") or [{"name": "input", "shape": [-1, 1, 28, 28]}]
    outputs = manifest.get("outputs") or [{"name": "logits"}]
    # One request carries one sample: dynamic dims (-1) become 1.
    shape = tuple(1 if d == -1 else int(d) for d in inputs[0]["shape"])
    return ModelVersion(
        name=model,
        version=version,
        directory=directory,
        onnx_path=directory / artifact["file"],
        input_name=str(inputs[0]["name"]),
        input_shape=shape,
        output_name=str(outputs[0]["name"]),
    )


def load_samples(
    model: ModelVersion, count: int = 64
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64] | None]:
    """Sample inputs (and labels, when published) from ``samples.npz``; random if absent."""
    path = model.directory / "samples.npz"
    if path.is_file():
        with np.load(path) as data:
            inputs = np.ascontiguousarray(data["input"][:count], dtype=np.float32)
            key = next((k for k in _LABEL_KEYS if k in data.files), None)
            labels = None if key is None else data[key][:count].astype(np.int64).reshape(-1)
        return inputs, labels
    rng = np.random.default_rng(0)
    return rng.random((count, *model.input_shape[1:]), dtype=np.float32), None
