"""The demo model: a small CNN trained on scikit-learn's digits, published in two versions."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from compilers.errors import BuildError
from compilers.pipeline import build_model
from compilers.progress import Progress, timed
from model_store.manifest import SAMPLES_FILE, ModelManifest, TensorSpec
from model_store.store import ModelStore

__all__ = [
    "DATASET",
    "DEMO_RECIPES",
    "INPUTS",
    "MIN_ACCURACY",
    "SAMPLES_FILE",
    "DemoRecipe",
    "DigitsData",
    "TrainedDigits",
    "digits_cnn",
    "load_digits_28",
    "publish_demo",
    "train_digits",
]

#: The demo's input: a batch of 28x28 grey images in [0, 1]; its output is "logits".
INPUTS = (TensorSpec(name="input", datatype="FP32", shape=[-1, 1, 28, 28]),)
#: The held-out accuracy under which the demo build fails.
MIN_ACCURACY = 0.95
DATASET = "sklearn.datasets.load_digits, 8x8 upsampled to 28x28 (bilinear), scaled to [0, 1]"

_SPLIT_SEED = 0
_TEST_SIZE = 0.2
_BATCH = 32
_LR = 2e-3
# One thread: the same sums in the same order on every host, and for a model this
# small two threads gain little alone and lose several times over on a busy host
# (measured: 1.0 s an epoch on one thread, 3-8 s on two beside other work).
_TRAIN_THREADS = 1


@dataclass(frozen=True)
class DemoRecipe:
    """How one demo version is trained."""

    seed: int
    epochs: int


#: One recipe per published version, in version order.
DEMO_RECIPES = (DemoRecipe(seed=0, epochs=6), DemoRecipe(seed=1, epochs=8))


def digits_cnn() -> nn.Module:
    """The classic MNIST CNN, untrained: [N, 1, 28, 28] images in, [N, 10] logits out."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 3 * 3, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@dataclass(frozen=True)
class DigitsData:
    """The digits at 28x28, split into a stratified training set and a held-out set."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_28(split_seed: int = _SPLIT_SEED) -> DigitsData:
    """scikit-learn's bundled digits as float32 [N, 1, 28, 28] in [0, 1] and int64 labels."""
    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    x = images.clamp(0.0, 1.0).numpy()
    y = digits.target.astype(np.int64)
    train, test = train_test_split(
        np.arange(len(y)), test_size=_TEST_SIZE, stratify=y, random_state=split_seed
    )
    return DigitsData(x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])


@dataclass(frozen=True)
class TrainedDigits:
    """A trained demo CNN (in eval mode) and how it was trained and how well it does."""

    module: nn.Module
    accuracy: float
    seed: int
    epochs: int
    train_seconds: float
    n_train: int
    n_test: int


@contextlib.contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(_TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def train_digits(
    seed: int, epochs: int, data: DigitsData | None = None, progress: Progress | None = None
) -> TrainedDigits:
    """Train the demo CNN with Adam and a one-cycle schedule; same seed, same weights.

    ``progress`` receives one line per epoch.
    """
    data = load_digits_28() if data is None else data
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    with _deterministic_torch(seed):
        model = digits_cnn()
        optimizer = torch.optim.Adam(model.parameters(), lr=_LR)
        steps_per_epoch = -(-len(x_train) // _BATCH)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=_LR, total_steps=epochs * steps_per_epoch
        )
        order = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        model.train()
        for epoch in range(1, epochs + 1):
            with timed(progress, f"train seed {seed}: epoch {epoch}/{epochs}") as note:
                permutation = torch.randperm(len(x_train), generator=order)
                total = 0.0
                for first in range(0, len(permutation), _BATCH):
                    batch = permutation[first : first + _BATCH]
                    optimizer.zero_grad()
                    loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
                    loss.backward()  # type: ignore[no-untyped-call]
                    optimizer.step()
                    schedule.step()
                    total += float(loss.detach()) * len(batch)
                note["detail"] = f"loss {total / len(permutation):.4f}"
        train_seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            predicted = model(torch.from_numpy(data.x_test)).argmax(dim=1).numpy()
    return TrainedDigits(
        module=model,
        accuracy=float(np.mean(predicted == data.y_test)),
        seed=seed,
        epochs=epochs,
        train_seconds=train_seconds,
        n_train=len(data.y_train),
        n_test=len(data.y_test),
    )


def publish_demo(
    store: ModelStore,
    name: str = "digits",
    if_missing: bool = False,
    progress: Progress | None = None,
) -> list[ModelManifest]:
    """Train and publish one version of the demo per recipe; return their manifests.

    With ``if_missing``, publish nothing (and return ``[]``) when ``name`` has versions.
    Each version carries ``samples.npz`` (the held-out set) and its training record
    in the metadata; a version under ``MIN_ACCURACY`` fails the build. ``progress``
    receives a line per phase (epochs, export, compile, parity, publish).
    """
    if if_missing and store.versions(name):
        return []
    data = load_digits_28()
    manifests = []
    with tempfile.TemporaryDirectory(prefix="fermion-demo-") as tmp:
        samples = Path(tmp) / SAMPLES_FILE
        np.savez_compressed(samples, input=data.x_test, labels=data.y_test)
        for recipe in DEMO_RECIPES:
            trained = train_digits(recipe.seed, recipe.epochs, data, progress)
            if trained.accuracy < MIN_ACCURACY:
                raise BuildError(
                    f"demo model (seed {recipe.seed}, {recipe.epochs} epochs) reached held-out "
                    f"accuracy {trained.accuracy:.4f}, under the minimum {MIN_ACCURACY}"
                )
            manifests.append(
                build_model(
                    store,
                    name,
                    module=trained.module,
                    inputs=INPUTS,
                    output_names=["logits"],
                    samples=data.x_test,
                    extra_files={SAMPLES_FILE: samples},
                    progress=progress,
                    metadata={
                        "accuracy": trained.accuracy,
                        "dataset": DATASET,
                        "seed": trained.seed,
                        "split_seed": _SPLIT_SEED,
                        "epochs": trained.epochs,
                        "train_seconds": round(trained.train_seconds, 3),
                        "n_train": trained.n_train,
                        "n_test": trained.n_test,
                        "labels": list(range(10)),
                    },
                )
            )
    return manifests
