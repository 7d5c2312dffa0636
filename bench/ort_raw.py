"""Raw in-process ONNX Runtime throughput: the compute ceiling, without HTTP.

python -m bench.ort_raw --store model_store --model digits
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from bench._store import find_model_version, load_samples

__all__ = ["OrtRawResult", "main", "measure_ort"]


@dataclass(frozen=True)
class OrtRawResult:
    """Throughput of ``session.run`` at one batch size."""

    batch: int
    calls: int
    samples_per_s: float
    calls_per_s: float
    p50_ms: float
    p99_ms: float


def measure_ort(
    onnx_path: Path,
    input_name: str,
    samples: npt.NDArray[np.float32],
    batch_sizes: tuple[int, ...] = (1, 8, 64),
    seconds: float = 3.0,
) -> list[OrtRawResult]:
    """Time ``session.run`` (1 intra-op thread) back to back at each batch size."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    results = []
    for batch in batch_sizes:
        reps = -(-batch // len(samples))
        x = np.ascontiguousarray(np.concatenate([samples] * reps)[:batch])
        for _ in range(20):
            session.run(None, {input_name: x})
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while (start := time.perf_counter()) < deadline:
            session.run(None, {input_name: x})
            times.append(time.perf_counter() - start)
        total = sum(times)
        times.sort()
        results.append(
            OrtRawResult(
                batch=batch,
                calls=len(times),
                samples_per_s=batch * len(times) / total,
                calls_per_s=len(times) / total,
                p50_ms=statistics.median(times) * 1e3,
                p99_ms=times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3,
            )
        )
    return results


def main(argv: list[str] | None = None) -> None:
    """Print raw ONNX Runtime throughput for a store's model."""
    parser = argparse.ArgumentParser(description="Raw in-process ONNX Runtime throughput.")
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--model", default="digits")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    model = find_model_version(args.store, args.model)
    samples, _ = load_samples(model)
    for result in measure_ort(model.onnx_path, model.input_name, samples, seconds=args.seconds):
        print(asdict(result))


if __name__ == "__main__":
    main()
