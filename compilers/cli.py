"""The ``fermion build`` and ``fermion demo`` subcommands (wired in by serving.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from compilers.errors import BuildError
from model_store.manifest import ModelManifest, TensorSpec
from model_store.store import ModelStore

__all__ = [
    "add_build_parser",
    "add_demo_parser",
    "parse_target_option",
    "parse_tensor_spec",
    "run_build",
    "run_demo",
]

_DEFAULT_STORE = "model_store"


def parse_tensor_spec(text: str) -> TensorSpec:
    """Parse ``NAME:DATATYPE:SHAPE``, e.g. ``input:FP32:-1,1,28,28``."""
    name, sep, rest = text.rpartition(":")
    name, sep2, datatype = name.rpartition(":")
    if not (sep and sep2 and name):
        raise argparse.ArgumentTypeError(
            f"expected NAME:DATATYPE:SHAPE (e.g. input:FP32:-1,1,28,28), got {text!r}"
        )
    try:
        shape = [int(d) for d in rest.split(",")] if rest else []
        return TensorSpec(name=name, datatype=datatype.upper(), shape=shape)  # type: ignore[arg-type]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad tensor spec {text!r}: {exc}") from None


def parse_target_option(text: str) -> tuple[str, str, Any]:
    """Parse ``TARGET.KEY=VALUE``; VALUE is read as JSON (``64``, ``true``) or else a string."""
    name, sep, raw = text.partition("=")
    target, dot, key = name.partition(".")
    if not (sep and dot and target and key):
        raise argparse.ArgumentTypeError(
            f"expected TARGET.KEY=VALUE (e.g. tensorrt.precision=fp16), got {text!r}"
        )
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return target, key, value


def _target_options(options: list[tuple[str, str, Any]]) -> dict[str, dict[str, Any]]:
    by_target: dict[str, dict[str, Any]] = {}
    for target, key, value in options:
        by_target.setdefault(target, {})[key] = value
    return by_target


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more comma-separated names")
    return names


def add_build_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``build``: export a module or take an ONNX file, compile, check, publish."""
    parser = subparsers.add_parser(
        "build",
        help="compile a torch module or ONNX file and publish it as a new model version",
        description="Export (torch) or read (ONNX) a model, compile it for each target, "
        "check each artifact's parity with the reference and publish a new version.",
    )
    parser.add_argument("--store", type=Path, default=Path(_DEFAULT_STORE), help="store root")
    parser.add_argument("--name", required=True, help="model name")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--module", metavar="PKG.MOD:FACTORY", help="factory of a torch module")
    source.add_argument("--onnx", type=Path, metavar="PATH", help="an ONNX model file")
    parser.add_argument(
        "--input",
        dest="inputs",
        action="append",
        type=parse_tensor_spec,
        default=[],
        metavar="NAME:DTYPE:SHAPE",
        help="a module input in argument order, dim 0 = -1 (repeat per input)",
    )
    parser.add_argument(
        "--output",
        dest="outputs",
        action="append",
        default=[],
        metavar="NAME",
        help="a module output name, in order (repeat per output)",
    )
    parser.add_argument(
        "--targets", type=_names, default=["onnxruntime"], help="comma-separated compile targets"
    )
    parser.add_argument(
        "--option",
        dest="target_options",
        action="append",
        type=parse_target_option,
        default=[],
        metavar="TARGET.KEY=VALUE",
        help="a target option, e.g. torch.device=cuda or tensorrt.precision=int8 (repeatable)",
    )
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument(
        "--samples",
        type=Path,
        metavar="FILE.npz",
        help="parity inputs: one array per model input, by name (random when absent)",
    )
    parser.add_argument(
        "--file",
        dest="files",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="an extra file to publish with the version (repeatable)",
    )
    parser.add_argument("--atol", type=float, help="absolute tolerance (default per precision)")
    parser.add_argument("--rtol", type=float, help="relative tolerance (default per precision)")
    parser.set_defaults(func=run_build)


def add_demo_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``demo``: train the digits CNN and publish its two versions."""
    parser = subparsers.add_parser(
        "demo",
        help="train the demo digits model and publish two versions of it",
        description="Train the demo CNN on scikit-learn's digits (two recipes) and publish "
        "each as a version, with its held-out set as samples.npz.",
    )
    parser.add_argument("--store", type=Path, default=Path(_DEFAULT_STORE), help="store root")
    parser.add_argument("--name", default="digits", help="model name")
    parser.add_argument(
        "--if-missing", action="store_true", help="do nothing when the model has versions"
    )
    parser.set_defaults(func=run_demo)


def _load_samples(path: Path, input_names: list[str] | None) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    if input_names is None:
        return arrays
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise BuildError(f"{path} has arrays {sorted(arrays)}, not the inputs {missing}")
    return {n: arrays[n] for n in input_names}


def _summary(manifest: ModelManifest) -> str:
    lines = [f"{manifest.name} version {manifest.version} ({manifest.platform})"]
    for artifact in manifest.artifacts:
        line = f"  {artifact.target}: {artifact.file}"
        if artifact.parity is not None:
            p = artifact.parity
            line += (
                f", parity vs {p.reference} on {p.samples} samples: max abs err "
                f"{p.max_abs_err:.3g}, max rel err {p.max_rel_err:.3g} "
                f"(atol {p.atol:g}, rtol {p.rtol:g})"
            )
            if p.top1_agreement is not None:
                line += f", top-1 agreement {p.top1_agreement:.4f}"
        lines.append(line)
    if "accuracy" in manifest.metadata:
        lines.append(f"  held-out accuracy {float(manifest.metadata['accuracy']):.4f}")
    return "\n".join(lines)


def _progress(line: str) -> None:
    """A phase's progress line, on stderr (stdout keeps the summary)."""
    print(f"  {line}", file=sys.stderr, flush=True)


def run_build(args: argparse.Namespace) -> int:
    """Run ``fermion build``; print a summary and return 0, or raise on failure."""
    from compilers.export import load_module
    from compilers.pipeline import build_model
    from compilers.signature import read_onnx_signature

    if args.onnx is not None and (args.inputs or args.outputs):
        raise BuildError("--input/--output describe a --module; an ONNX file has its own")
    if args.module is not None and not args.inputs:
        raise BuildError("--module needs its inputs: --input NAME:DTYPE:SHAPE (repeatable)")
    samples = None
    if args.samples is not None:
        if args.module is not None:
            names = [s.name for s in args.inputs]
        else:
            try:
                names = read_onnx_signature(args.onnx).input_names
            except (OSError, ValueError) as exc:
                raise BuildError(f"cannot read the inputs of {args.onnx}: {exc}") from exc
        samples = _load_samples(args.samples, names)
    manifest = build_model(
        ModelStore(args.store),
        args.name,
        module=load_module(args.module) if args.module is not None else None,
        onnx_path=args.onnx,
        inputs=args.inputs or None,
        output_names=args.outputs or None,
        targets=args.targets,
        target_options=_target_options(args.target_options),
        max_batch_size=args.max_batch_size,
        samples=samples,
        extra_files={p.name: p for p in args.files},
        atol=args.atol,
        rtol=args.rtol,
        progress=_progress,
    )
    print(_summary(manifest))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Run ``fermion demo``; print a summary and return 0, or raise on failure."""
    from compilers.demo import publish_demo

    store = ModelStore(args.store)
    manifests = publish_demo(store, args.name, if_missing=args.if_missing, progress=_progress)
    if not manifests:
        print(f"{args.name} already has versions {store.versions(args.name)} in {store.root}")
    for manifest in manifests:
        print(_summary(manifest))
    return 0
