"""The torch target on a GPU: build, parity, and the replica next to raw torch, in one run.

    python -m bench.gpu_bench                  # CUDA: demo CNN + ResNet-18, fp16 packages
    python -m bench.gpu_bench --cpu            # the same path on the CPU (fp32), smaller images
    python -m bench.gpu_bench --models digits --out results.json

For each model it builds a version with targets ``onnxruntime`` and ``torch``
(AOTInductor, CUDA graphs at serving) into a scratch store, with parity checked by
the pipeline against the torch module, loads it in a ``ModelReplica`` that prefers
the torch package, and measures rows per second at batch 1, 8 and 64 for:

- ``replica``: ``ModelReplica.run`` on numpy arrays, as the serving path calls it;
- ``raw``: the same module in-process in torch (eager, same precision, under
  ``inference_mode``), numpy in and numpy out, so both include the copies.

Models: ``digits`` (the demo CNN, trained weights not needed for speed: seeded
random) and ``resnet18`` (a ResNet-18 written here with random weights, since
torchvision cannot be installed beside this torch). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compilers.demo import digits_cnn
from compilers.pipeline import build_model
from model_store.manifest import TensorSpec
from model_store.store import ModelStore
from serving.inference.executors import ExecutorOptions
from serving.inference.replica import ModelReplica

__all__ = ["BasicBlock", "main", "resnet18"]

_BATCHES = (1, 8, 64)
_MAX_BATCH = 64


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with a shortcut (projected when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.relu(out + self.shortcut(x))
        return result


def resnet18(num_classes: int = 1000) -> nn.Module:
    """ResNet-18 (He et al. 2015, the torchvision layout) with seeded random weights."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers).eval()


def _models(cpu: bool) -> dict[str, tuple[Callable[[], nn.Module], list[int]]]:
    side = 64 if cpu else 224
    return {
        "digits": (lambda: (torch.manual_seed(0), digits_cnn())[1].eval(), [1, 28, 28]),
        "resnet18": (resnet18, [3, side, side]),
    }


def _rows_per_s(run: Callable[[np.ndarray], Any], x: np.ndarray, seconds: float) -> float:
    for _ in range(3):
        run(x)
    done = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        run(x)
        done += len(x)
    return done / elapsed


def _raw(module: nn.Module, device: str, dtype: torch.dtype) -> Callable[[np.ndarray], Any]:
    model = module.to(device=device, dtype=dtype)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(x).to(device=device, dtype=dtype))
            result: np.ndarray = out.float().cpu().numpy()
        return result

    return run


def _bench_model(
    name: str, factory: Callable[[], nn.Module], dims: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    device = "cpu" if args.cpu else "cuda"
    precision = "fp32" if args.cpu else args.precision
    module = factory()
    with tempfile.TemporaryDirectory(prefix="fermion-gpu-bench-") as tmp:
        store = ModelStore(Path(tmp))
        started = time.perf_counter()
        manifest = build_model(
            store,
            name,
            module=module,
            inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, *dims])],
            output_names=["logits"],
            targets=["onnxruntime", "torch"],
            target_options={"torch": {"device": device, "precision": precision}},
            max_batch_size=_MAX_BATCH,
        )
        build_s = time.perf_counter() - started
        torch_artifact = manifest.artifact("torch")
        assert torch_artifact is not None and torch_artifact.parity is not None
        replica = ModelReplica(
            store, manifest, prefer=["torch"], options=ExecutorOptions(args.threads)
        )
        assert replica.choice.artifact.target == "torch", replica.choice.skipped
        raw = _raw(module, device, {"fp32": torch.float32, "fp16": torch.float16}[precision])
        rng = np.random.default_rng(0)
        rows = []
        for batch in args.batches:
            x = rng.random((batch, *dims), dtype=np.float32)
            served = _rows_per_s(lambda a: replica.run({"input": a}), x, args.seconds)
            eager = _rows_per_s(raw, x, args.seconds)
            rows.append(
                {
                    "batch": batch,
                    "replica_rows_s": served,
                    "raw_rows_s": eager,
                    "ratio": served / eager,
                }
            )
        description = replica.describe()
        replica.close()
    return {
        "model": name,
        "device": device,
        "precision": precision,
        "build_seconds": round(build_s, 1),
        "parity": torch_artifact.parity.model_dump(),
        "artifact": description,
        "throughput": rows,
    }


def _print(results: list[dict[str, Any]], header: str) -> None:
    print(header)
    print(
        f"{'model':<10} {'batch':>5} {'replica rows/s':>15} {'raw torch rows/s':>17} {'ratio':>6}"
    )
    for r in results:
        for row in r["throughput"]:
            print(
                f"{r['model']:<10} {row['batch']:>5} {row['replica_rows_s']:>15.0f} "
                f"{row['raw_rows_s']:>17.0f} {row['ratio']:>6.2f}"
            )
        p = r["parity"]
        print(
            f"{r['model']:<10} build {r['build_seconds']} s, parity max abs err "
            f"{p['max_abs_err']:.3g} (atol {p['atol']:g}), top-1 {p['top1_agreement']}, "
            f"CUDA graphs {r['artifact']['runtime'].get('cuda_graphs')}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every model built, passed parity and ran."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU packages (fp32), small images")
    parser.add_argument("--models", default="digits,resnet18", help="comma-separated")
    parser.add_argument("--precision", default="fp16", choices=["fp32", "fp16"], help="on CUDA")
    parser.add_argument(
        "--batches", type=lambda s: [int(b) for b in s.split(",")], default=list(_BATCHES)
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA GPU that torch can use: run with --cpu", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    available = _models(args.cpu)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f"unknown models {unknown}; known: {sorted(available)}", file=sys.stderr)
        return 2
    results = [_bench_model(n, *available[n], args) for n in names]
    header = f"torch {torch.__version__}, " + (
        torch.cuda.get_device_name() if not args.cpu else f"CPU, {torch.get_num_threads()} threads"
    )
    _print(results, header)
    if args.out is not None:
        args.out.write_text(json.dumps({"host": header, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
