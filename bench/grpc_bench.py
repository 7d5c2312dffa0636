"""Fermion over gRPC vs over HTTP (binary and JSON), side by side in one run.

One ``fermion serve`` answers both transports; one asyncio load generator
(``bench/_asyncload.py``) drives every cell, so the ratios compare the transports and
not two load tools. At each concurrency the cells run back to back: grpc (raw tensors),
http-binary (the binary tensor extension), http-json. ``--profile DIR`` then samples
the server with py-spy (``--gil``: the Python side's CPU) during one more cell of each
kind at the highest concurrency and prints where it goes per request.

    .venv/bin/python -m bench.grpc_bench [--quick] [--store model_store] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import uvloop
from tritonclient.grpc import service_pb2 as pb

from bench._asyncload import LoadResult, grpc_sender, http_sender, run_closed_loop
from bench._payloads import Payload, binary_payload, check_answer, json_payload
from bench._procs import ServerProcess, cores_between, cpu_seconds, free_port, machine_ticks
from bench._procs import wait_quiet as _wait_quiet
from bench._profile import summarize_profile
from bench._store import find_model_version, load_samples

__all__ = ["main"]

_HOST = "127.0.0.1"
_ROOT = Path(__file__).resolve().parent.parent
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
_KINDS = ("grpc", "http-binary", "http-json")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.grpc_bench", description=__doc__)
    p.add_argument("--store", type=Path, default=Path("model_store"))
    p.add_argument("--model", default="digits")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per cell")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--concurrency", default="1,64", help="comma-separated")
    p.add_argument("--quick", action="store_true", help="3 s cells, 1 s warm-up")
    p.add_argument("--wait-quiet", type=float, default=30.0, help="max wait for idle cores")
    p.add_argument("--fermion", default=str(Path(sys.executable).with_name("fermion")))
    p.add_argument("--profile", type=Path, help="py-spy the server into this folder")
    p.add_argument("--out", type=Path, default=_ROOT / "bench" / "results" / "grpc.json")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
    args.levels = [int(c) for c in args.concurrency.split(",")]
    return args


def _grpc_request(model: str, input_name: str, x: np.ndarray) -> bytes:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, "<f4").tobytes())
    return bytes(request.SerializeToString())


def _grpc_argmax(address: str, request: bytes) -> int:
    with grpc.insecure_channel(address) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, Any] = channel.unary_unary(
            _MODEL_INFER, response_deserializer=pb.ModelInferResponse.FromString
        )
        response = call(request, timeout=30)
    return int(np.argmax(np.frombuffer(response.raw_output_contents[0], np.float32)))


async def _cell(
    kind: str,
    concurrency: int,
    args: argparse.Namespace,
    http_port: int,
    grpc_address: str,
    payloads: dict[str, Any],
    duration: float,
) -> LoadResult:
    if kind == "grpc":
        async with grpc.aio.insecure_channel(grpc_address) as channel:
            senders = [grpc_sender(channel, _MODEL_INFER, payloads["grpc"])] * concurrency
            return await run_closed_loop(senders, duration, args.warmup)
    payload: Payload = payloads[kind]
    path = f"/v2/models/{args.model}/infer"
    senders = [
        await http_sender(_HOST, http_port, path, payload.body, payload.headers())
        for _ in range(concurrency)
    ]
    return await run_closed_loop(senders, duration, args.warmup)


def _row(
    kind: str, concurrency: int, result: LoadResult, server: float, busy: float
) -> dict[str, Any]:
    return {
        "cell": kind,
        "concurrency": concurrency,
        "rps": round(result.rps, 1),
        "p50_ms": round(result.p50_ms, 3),
        "p99_ms": round(result.p99_ms, 3),
        "errors": result.errors,
        "first_error": result.first_error,
        "server_cores": round(server, 2),
        "server_us_per_request": round(server / result.rps * 1e6, 1) if result.rps else None,
        "generator_cores": round(result.generator_cores, 2),
        "machine_cores": round(busy, 2),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'cell':<12} {'c':>3} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'srv CPU':>8} {'us/req':>7} {'gen CPU':>8} {'machine':>8} errors"
    ]
    for r in rows:
        us = r["server_us_per_request"] or 0
        lines.append(
            f"{r['cell']:<12} {r['concurrency']:>3} {r['rps']:>9.1f} {r['p50_ms']:>8.3f} "
            f"{r['p99_ms']:>8.3f} {r['server_cores']:>8.2f} {us:>7.0f} "
            f"{r['generator_cores']:>8.2f} "
            f"{r['machine_cores']:>8.2f} {r['errors']}"
        )
    return "\n".join(lines)


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    by = {(r["cell"], r["concurrency"]): r for r in rows}
    for c in sorted({r["concurrency"] for r in rows}):
        g = by.get(("grpc", c))
        for other in ("http-binary", "http-json"):
            o = by.get((other, c))
            if g is None or o is None or not o["rps"] or not o["p50_ms"]:
                continue
            out.append(
                {
                    "concurrency": c,
                    "versus": other,
                    "rps_ratio": round(g["rps"] / o["rps"], 2),
                    "p50_ratio": round(g["p50_ms"] / o["p50_ms"], 2),
                    "p99_ratio": round(g["p99_ms"] / o["p99_ms"], 2) if o["p99_ms"] else None,
                }
            )
    return out


def _profile(
    args: argparse.Namespace, server: ServerProcess, run: Any, kind: str
) -> dict[str, Any]:
    """py-spy the server during one cell of ``kind`` at the highest concurrency."""
    args.profile.mkdir(parents=True, exist_ok=True)
    raw = args.profile / f"{kind}.txt"
    seconds = int(args.duration + args.warmup) + 1
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("py-spy")),
            *("record", "--pid", str(server.pid), "--rate", "250", "--gil", "--format", "raw"),
            *("--duration", str(seconds), "--output", str(raw)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    time.sleep(0.5)
    result: LoadResult = run(kind, max(args.levels), args.duration)
    spy.wait(timeout=seconds + 60)
    summary = summarize_profile(raw, rate_hz=250.0, seconds=seconds, rps=result.rps)
    summary["rps"] = round(result.rps, 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; non-zero only when the run itself is not valid."""
    args = _parse_args(argv)
    model = find_model_version(args.store, args.model)
    inputs, labels = load_samples(model, 1)
    x = inputs[:1]
    http_port, grpc_port = free_port(), free_port()
    grpc_address = f"{_HOST}:{grpc_port}"
    logs = Path(tempfile.mkdtemp(prefix="fermion-grpc-bench-"))
    argv_serve = [args.fermion, "serve", "--store", str(args.store), "--host", _HOST]
    argv_serve += ["--port", str(http_port), "--grpc-port", str(grpc_port)]
    server = ServerProcess(
        "fermion", argv_serve, f"http://{_HOST}:{http_port}", logs / "fermion.log"
    )
    payloads: dict[str, Any] = {
        "grpc": _grpc_request(args.model, model.input_name, x),
        "http-binary": binary_payload(model.input_name, model.output_name, x),
        "http-json": json_payload(model.input_name, x),
    }
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)

    def run(kind: str, concurrency: int, duration: float) -> LoadResult:
        return loop.run_until_complete(
            _cell(kind, concurrency, args, http_port, grpc_address, payloads, duration)
        )

    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {"store": str(args.store), "model": args.model}
    server.start()
    try:
        server.wait_ready()
        url = f"{server.base_url}/v2/models/{args.model}/infer"
        expected = _grpc_argmax(grpc_address, payloads["grpc"])
        if labels is not None and expected != int(labels[0]):
            print(f"note: the model answers {expected} for a sample labelled {labels[0]}")
        for kind in ("http-binary", "http-json"):
            answer = check_answer(url, payloads[kind], model.output_name, expected)
            if answer.error is not None:
                print(f"bench: {kind} answer is wrong: {answer.error}", file=sys.stderr)
                return 1
        for concurrency in args.levels:
            for kind in _KINDS:
                _wait_quiet(args.wait_quiet, 0.2)
                cpu0, ticks0 = cpu_seconds(server.pid), machine_ticks()
                t0 = time.monotonic()
                result = run(kind, concurrency, args.duration)
                wall = time.monotonic() - t0
                busy = cores_between(ticks0, machine_ticks()).busy
                rows.append(
                    _row(kind, concurrency, result, (cpu_seconds(server.pid) - cpu0) / wall, busy)
                )
                print(_table(rows[-1:]).splitlines()[-1], flush=True)
        if args.profile is not None:
            report["profile"] = {k: _profile(args, server, run, k) for k in _KINDS}
    finally:
        server.stop()
        loop.close()
    report["cells"] = rows
    report["ratios"] = _ratios(rows)
    print()
    print(_table(rows))
    print()
    for r in report["ratios"]:
        print(
            f"c={r['concurrency']:<3} grpc / {r['versus']:<11}: req/s x{r['rps_ratio']:.2f}  "
            f"p50 x{r['p50_ratio']:.2f}  p99 x{r['p99_ratio']}"
        )
    for kind, summary in report.get("profile", {}).items():
        print(
            f"\nprofile {kind}: {summary['samples']} samples, {summary['rps']} req/s, "
            f"{summary['busy_us_per_request']} us with the GIL per request"
        )
        for line in [*summary["top"], {"what": "-- most samples of their own:"}, *summary["self"]]:
            if "share" not in line:
                print(f"  {line['what']}")
                continue
            print(
                f"  {line['us_per_request']:>7.1f} us/req {line['share'] * 100:5.1f}%  "
                f"{line['what']}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    invalid = [r for r in rows if r["errors"] or not r["rps"]]
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
