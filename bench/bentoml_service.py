"""A competitor: a BentoML service running the same ONNX model, with adaptive batching.

BentoML's own way to serve a model: a ``@bentoml.service`` class whose
``@bentoml.api(batchable=True)`` method runs one ONNX Runtime session (one intra-op
thread, as every other server here) on a batch that BentoML's adaptive batcher
gathered, up to 64 rows. One worker, access log off. BentoML speaks its own JSON
(``POST /predict`` with ``{"input": [[...]]}``), not V2: the bench sends it the
same sample in that form.

It runs in a virtual environment of its own (``bench/competitors.py`` makes it),
so this file imports nothing from Fermion. The ONNX file comes from
``$FERMION_BENCH_ONNX``:

    FERMION_BENCH_ONNX=M.onnx .bench-venvs/bentoml/bin/bentoml serve \
        bentoml_service:OnnxClassifier --working-dir bench --host 127.0.0.1 --port 8003
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
import onnxruntime as ort

__all__ = ["OnnxClassifier"]


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class OnnxClassifier:
    """One ONNX Runtime session behind BentoML's adaptive batching."""

    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            os.environ["FERMION_BENCH_ONNX"], options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=64)  # type: ignore[untyped-decorator]
    def predict(self, input: np.ndarray) -> np.ndarray:
        """Logits for a batch of images."""
        result: np.ndarray = self._session.run(None, {self._input: input.astype(np.float32)})[0]
        return result
