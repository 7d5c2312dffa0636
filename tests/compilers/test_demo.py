"""The demo model: trained to >= 95% held-out accuracy, deterministically, in two versions."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import torch

from compilers.demo import (
    DEMO_RECIPES,
    MIN_ACCURACY,
    SAMPLES_FILE,
    load_digits_28,
    publish_demo,
    train_digits,
)
from tests.helpers.demo import PublishedDemo


def test_two_versions_with_different_recipes_are_published(demo: PublishedDemo) -> None:
    assert [m.version for m in demo.manifests] == [1, 2]
    assert demo.store.versions("digits") == [1, 2]
    recipes = [(m.metadata["seed"], m.metadata["epochs"]) for m in demo.manifests]
    assert recipes == [(r.seed, r.epochs) for r in DEMO_RECIPES]
    assert len(set(recipes)) == 2
    for manifest in demo.manifests:
        assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [
            ("input", "FP32", [-1, 1, 28, 28])
        ]
        assert [(t.name, t.datatype, t.shape) for t in manifest.outputs] == [
            ("logits", "FP32", [-1, 10])
        ]
        assert manifest.max_batch_size == 64
        for key in ("accuracy", "dataset", "train_seconds", "n_train", "n_test"):
            assert key in manifest.metadata


def test_each_version_reaches_the_accuracy_floor_when_served_from_its_artifact(
    demo: PublishedDemo,
) -> None:
    for manifest in demo.manifests:
        artifact = manifest.artifact("onnxruntime")
        samples_file = next(f for f in manifest.files if f.file == SAMPLES_FILE)
        assert artifact is not None and artifact.parity is not None
        with np.load(demo.store.artifact_path(manifest, samples_file)) as samples:
            images, labels = samples["input"], samples["labels"]
        assert images.dtype == np.float32 and images.shape[1:] == (1, 28, 28)
        assert labels.dtype == np.int64 and labels.shape == (len(images),)
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert len(images) == manifest.metadata["n_test"]

        session = ort.InferenceSession(
            str(demo.store.artifact_path(manifest, artifact)), providers=["CPUExecutionProvider"]
        )
        (logits,) = session.run(None, {"input": images})
        accuracy = float(np.mean(logits.argmax(axis=1) == labels))

        assert accuracy >= MIN_ACCURACY
        assert accuracy == manifest.metadata["accuracy"]
        assert artifact.parity.samples == len(images)
        assert artifact.parity.top1_agreement == 1.0


def test_the_recorded_training_time_is_measured_within_the_build(demo: PublishedDemo) -> None:
    # What each manifest records is a measurement of this build: every training took
    # some time, and together they fit in the time the whole build took.
    trained = [float(m.metadata["train_seconds"]) for m in demo.manifests]
    assert all(seconds > 0 for seconds in trained), trained
    assert sum(trained) <= demo.seconds, (trained, demo.seconds)


def test_training_is_deterministic_for_a_seed() -> None:
    data = load_digits_28()
    lines: list[str] = []
    first = train_digits(3, epochs=2, data=data, progress=lines.append)
    again, other = (train_digits(s, epochs=2, data=data) for s in (3, 4))
    # One progress line per epoch, with its loss and time; reporting changes no weight.
    assert [line.split(":")[0] for line in lines] == ["train seed 3"] * 2
    assert [line.split(": ")[1] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all(re.search(r": loss [0-9.]+ \([0-9.]+ s\)$", line) for line in lines)

    weights = [m.module.state_dict() for m in (first, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert first.accuracy == again.accuracy


def test_the_held_out_split_is_stratified_and_fixed() -> None:
    data, again = load_digits_28(), load_digits_28()

    np.testing.assert_array_equal(data.y_test, again.y_test)
    counts = np.bincount(data.y_test, minlength=10) / len(data.y_test)
    overall = np.bincount(np.concatenate([data.y_train, data.y_test]), minlength=10)
    np.testing.assert_allclose(counts, overall / overall.sum(), atol=0.01)


def test_if_missing_publishes_nothing_when_the_model_exists(demo: PublishedDemo) -> None:
    assert publish_demo(demo.store, if_missing=True) == []
    assert demo.store.versions("digits") == [1, 2]
