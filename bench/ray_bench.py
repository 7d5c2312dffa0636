"""Cluster mode side by side: Fermion backend ray, Fermion backend local, plain Ray Serve.

One run, one server at a time (each Ray cluster has the machine to itself): start
it on a free loopback port, check one answer, drive each concurrency with wrk
(the same body script and JSON body as ``bench.http_bench``), stop it. Then print
the table with the issue's targets and write ``bench/results/ray.json``.

    .venv/bin/python -m bench.ray_bench [--quick] [--duration 10] [--concurrency 1,64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._payloads import Payload, check_answer, json_payload
from bench._procs import ServerProcess, cores_between, cpu_seconds, free_port, machine_ticks
from bench._report import Cell
from bench._store import ModelVersion, find_model_version, load_samples
from bench._wrk import find_wrk, run_wrk

__all__ = ["main"]

_ROOT = Path(__file__).resolve().parent.parent
_HOST = "127.0.0.1"
#: The issue's targets: Fermion ray against plain Ray Serve.
RPS_RATIO_MIN = 3.0
P50_RATIO_MAX = 1 / 3
_ORDER = ("fermion-ray", "fermion-local", "plain-serve")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ray_bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--store", type=Path, default=Path(os.environ.get("STORE", "model_store")))
    parser.add_argument("--model", default="digits")
    parser.add_argument("--duration", type=int, default=int(os.environ.get("DURATION", "10")))
    parser.add_argument("--warmup", type=int, default=3, help="seconds of load before each cell")
    parser.add_argument("--quick", action="store_true", help="4 s cells, 2 s warm-ups")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated, default 1,64")
    parser.add_argument(
        "--ray-concurrent-batches",
        type=int,
        default=2,
        help="batching.max_concurrent_batches of Fermion backend ray (default 2)",
    )
    parser.add_argument("--only", choices=_ORDER, action="append", help="run only these servers")
    parser.add_argument(
        "--fermion", default=str(Path(sys.executable).with_name("fermion")), help="fermion CLI"
    )
    parser.add_argument(
        "--out", type=Path, default=_ROOT / "bench" / "results" / "ray.json", help="results JSON"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 4, 2
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    return args


def _fermion_config(args: argparse.Namespace, version: int, backend: str) -> str:
    lines = [
        f"backend: {backend}",
        "models:",
        f"  {args.model}: {{versions: [{version}]}}",
    ]
    if backend == "ray":
        lines += [
            f"batching: {{max_concurrent_batches: {args.ray_concurrent_batches}}}",
            "ray: {deployment: {num_cpus: 1}}",
        ]
    return "\n".join(lines) + "\n"


def _server(name: str, args: argparse.Namespace, version: int, work: Path) -> ServerProcess:
    port = free_port()
    url = f"http://{_HOST}:{port}"
    if name == "plain-serve":
        argv = [sys.executable, "-m", "bench.ray_serve_plain", "--store", str(args.store)]
        argv += ["--model", args.model, "--port", str(port)]
    else:
        config = work / f"{name}.yaml"
        config.write_text(_fermion_config(args, version, name.removeprefix("fermion-")))
        argv = [args.fermion, "serve", "--store", str(args.store), "--config", str(config)]
        argv += ["--grpc-port", "off"]
        argv += ["--host", _HOST, "--port", str(port)]
    return ServerProcess(name, argv, url, work / f"{name}.log")


def _measure(
    server: ServerProcess, url: str, payload: Payload, body: Path, conc: int, args: Any, wrk: str
) -> Cell:
    cell = Cell(server.name, payload.kind, conc)
    try:
        run_wrk(wrk, url, payload, body, connections=conc, threads=1, duration_s=args.warmup)
        cpu0, ticks0 = cpu_seconds(server.pid), machine_ticks()
        started = time.monotonic()
        cell.result = run_wrk(
            wrk, url, payload, body, connections=conc, threads=1, duration_s=args.duration
        )
        wall = time.monotonic() - started
        ticks1 = machine_ticks()
        cell.server_cpu = (cpu_seconds(server.pid) - cpu0) / wall
        cell.machine_busy = cores_between(ticks0, ticks1).busy
    except RuntimeError as exc:
        cell.error = str(exc)
    return cell


def _run_server(
    name: str, args: argparse.Namespace, payload: Payload, expected: int, work: Path, wrk: str
) -> tuple[list[Cell], dict[str, Any]]:
    model = find_model_version(args.store, args.model)
    server = _server(name, args, model.version, work)
    url = f"{server.base_url}/v2/models/{args.model}/infer"
    body = work / "body.json"
    body.write_bytes(payload.body)
    notes: dict[str, Any] = {}
    started = time.monotonic()
    server.start()
    try:
        server.wait_ready(timeout=240)
        notes["ready_s"] = round(time.monotonic() - started, 1)
        answer = None
        for _ in range(3):
            answer = check_answer(url, payload, model.output_name, expected)
        if answer is not None and answer.error is not None:
            raise RuntimeError(f"wrong answer: {answer.error}")
        cells = []
        for conc in args.concurrency:
            print(f".. {name} c={conc}", flush=True)
            cells.append(_measure(server, url, payload, body, conc, args, wrk))
        return cells, notes
    except RuntimeError as exc:
        print(f"!! {name}: {exc}", file=sys.stderr, flush=True)
        notes["error"] = str(exc)
        return [Cell(name, payload.kind, c, error=str(exc)) for c in args.concurrency], notes
    finally:
        server.stop(timeout=60)


def _table(cells: list[Cell]) -> str:
    plain = {c.concurrency: c.result for c in cells if c.server == "plain-serve" and c.result}
    head = (
        f"{'server':<14} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'req/s/plain':>11} {'p50/plain':>9} {'srv CPU':>7} {'machine':>7} {'errors':>6}"
    )
    lines = [head, "-" * len(head)]
    for c in cells:
        r = c.result
        if r is None:
            lines.append(f"{c.server:<14} {c.concurrency:>4}  not run: {c.error}")
            continue
        p = plain.get(c.concurrency)
        rps = f"{r.rps / p.rps:.2f}x" if p else "-"
        p50 = f"{r.latency_us['p50'] / p.latency_us['p50']:.2f}x" if p else "-"
        lines.append(
            f"{c.server:<14} {c.concurrency:>4} {r.rps:>8.0f} {r.ms('p50'):>8.2f} "
            f"{r.ms('p99'):>8.2f} {rps:>11} {p50:>9} {c.server_cpu:>6.0%} "
            f"{c.machine_busy:>6.0%} {sum(r.errors.values()):>6}"
        )
    lines.append("srv CPU: the server's process tree (Ray cluster included); machine: all cores.")
    return "\n".join(lines)


def _targets(cells: list[Cell], low: int, high: int) -> list[dict[str, Any]]:
    by = {(c.server, c.concurrency): c.result for c in cells}
    checks = []
    ray_hi, plain_hi = by.get(("fermion-ray", high)), by.get(("plain-serve", high))
    ray_lo, plain_lo = by.get(("fermion-ray", low)), by.get(("plain-serve", low))
    ratio = ray_hi.rps / plain_hi.rps if ray_hi and plain_hi else None
    checks.append(
        {
            "name": f"c={high} fermion-ray req/s >= {RPS_RATIO_MIN:g}x plain Ray Serve",
            "measured": ratio,
            "status": "N/A" if ratio is None else ("PASS" if ratio >= RPS_RATIO_MIN else "MISS"),
        }
    )
    p50 = ray_lo.latency_us["p50"] / plain_lo.latency_us["p50"] if ray_lo and plain_lo else None
    checks.append(
        {
            "name": f"c={low} fermion-ray p50 <= 1/3 of plain Ray Serve p50",
            "measured": p50,
            "status": "N/A" if p50 is None else ("PASS" if p50 <= P50_RATIO_MAX else "MISS"),
        }
    )
    errors = [c for c in cells if c.result is None or any(c.result.errors.values())]
    checks.append(
        {
            "name": "every cell ran, wrk saw zero errors and zero non-2xx",
            "measured": f"{len(cells) - len(errors)}/{len(cells)}",
            "status": "MISS" if errors else "PASS",
        }
    )
    return checks


def _pick_sample(model: ModelVersion) -> tuple[np.ndarray[Any, Any], int]:
    """A sample input and the class every server must answer: the one ONNX Runtime gives."""
    import onnxruntime as ort

    samples, labels = load_samples(model)
    session = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
    predicted = np.asarray(session.run(None, {model.input_name: samples})[0]).argmax(axis=1)
    agree = [i for i in range(len(predicted)) if labels is None or predicted[i] == labels[i]]
    i = agree[0] if agree else 0
    return samples[i : i + 1], int(predicted[i])


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; non-zero only when the run itself was not valid."""
    args = _parse_args(argv)
    wrk = find_wrk()
    model = find_model_version(args.store, args.model)
    sample, expected = _pick_sample(model)
    payload = json_payload(model.input_name, sample)
    cells: list[Cell] = []
    notes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fermion-ray-bench-") as tmp:
        for name in args.only or _ORDER:
            got, notes[name] = _run_server(name, args, payload, expected, Path(tmp), wrk)
            cells += got
    low, high = min(args.concurrency), max(args.concurrency)
    checks = _targets(cells, low, high)
    print()
    print(_table(cells))
    print("\ntargets:")
    for check in checks:
        measured = check["measured"]
        shown = f"{measured:.2f}x" if isinstance(measured, float) else str(measured)
        print(f"{check['status']:<4}  {check['name']}  {shown}")
    record = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": model.name, "version": model.version},
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "ray_concurrent_batches": args.ray_concurrent_batches,
            "cores": os.cpu_count(),
        },
        "servers": notes,
        "cells": [c.record(None) for c in cells],
        "targets": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 1 if any(c.result is None for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
