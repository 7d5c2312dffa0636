"""The build and demo subcommands, as the fermion entry point wires them."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest

from compilers.cli import add_build_parser, add_demo_parser, parse_tensor_spec
from compilers.errors import BuildError
from model_store.store import ModelStore
from tests.helpers.demo import PublishedDemo
from tests.helpers.tiny_models import write_matmul_onnx


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fermion")
    subparsers = parser.add_subparsers(required=True)
    add_build_parser(subparsers)
    add_demo_parser(subparsers)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_build_from_a_module_spec_publishes_and_summarises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _run(
        [
            "build",
            "--store",
            str(tmp_path),
            "--name",
            "mlp",
            "--module",
            "tests.helpers.tiny_models:tiny_mlp",
            "--input",
            "x:FP32:-1,4",
            "--output",
            "scores",
            "--max-batch-size",
            "8",
        ]
    )

    assert code == 0
    manifest = ModelStore(tmp_path).manifest("mlp")
    assert manifest.outputs[0].name == "scores"
    captured = capsys.readouterr()
    assert "mlp version 1" in captured.out
    assert "parity vs torch on 8 samples" in captured.out
    # One progress line per phase, in order, each with its time, on stderr.
    phases = [line.strip() for line in captured.err.splitlines()]
    assert [re.sub(r" \([0-9.]+ s\)$", "", p).split(":")[1].strip() for p in phases] == [
        "export to ONNX (opset 18)",
        "compile onnxruntime",
        "parity of onnxruntime on 8 samples",
        "publish",
    ]
    assert all(re.search(r"\([0-9]+\.[0-9]{2} s\)$", p) for p in phases)
    assert phases[-1].startswith(f"mlp: publish: version 1 in {tmp_path}")


def test_build_from_an_onnx_file_with_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "given.onnx"
    write_matmul_onnx(source)
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=np.ones((5, 3), np.float32), labels=np.zeros(5, np.int64))

    code = _run(
        [
            "build",
            "--store",
            str(tmp_path / "store"),
            "--name",
            "mm",
            "--onnx",
            str(source),
            "--samples",
            str(samples),
            "--atol",
            "1e-3",
        ]
    )

    assert code == 0
    parity = ModelStore(tmp_path / "store").manifest("mm").artifacts[0].parity
    assert parity is not None
    assert (parity.reference, parity.samples, parity.atol) == ("onnx", 5, 1e-3)
    assert "parity vs onnx on 5 samples" in capsys.readouterr().out


def test_build_of_a_module_without_inputs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="--module needs its inputs"):
        _run(["build", "--store", str(tmp_path), "--name", "m", "--module", "a.b:c"])


def test_demo_if_missing_reports_the_existing_versions(
    demo: PublishedDemo, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _run(["demo", "--store", str(demo.store.root), "--if-missing"])

    assert code == 0
    assert "digits already has versions [1, 2]" in capsys.readouterr().out


def test_tensor_specs_parse_and_bad_ones_are_explained() -> None:
    spec = parse_tensor_spec("input:fp32:-1,1,28,28")
    assert (spec.name, spec.datatype, spec.shape) == ("input", "FP32", [-1, 1, 28, 28])
    with pytest.raises(argparse.ArgumentTypeError, match="NAME:DATATYPE:SHAPE"):
        parse_tensor_spec("input-1,4")
    with pytest.raises(argparse.ArgumentTypeError, match="bad tensor spec"):
        parse_tensor_spec("input:FP33:-1,4")
