"""The cost of the hop: Fermion backend remote in front of Fermion local, vs Fermion local alone.

One run starts a Fermion gateway serving the model from the store ("local") and a
second one with backend remote whose upstream is the first ("remote -> local"),
both on loopback. It checks one answer through each, then drives each cell with
wrk (the same body script and JSON body as ``bench.http_bench``), alternating the
two servers at each concurrency so that both see the same machine. It prints the
table, the p50 the hop adds at the lowest concurrency and the req/s ratio at the
highest, and writes ``bench/results/remote.json``.

    .venv/bin/python -m bench.remote_bench [--quick] [--duration 10] [--concurrency 1,64]
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

from bench._payloads import Payload, binary_payload, check_answer, json_payload
from bench._procs import (
    ServerProcess,
    cores_between,
    cpu_seconds,
    free_port,
    machine_ticks,
    wait_quiet,
)
from bench._report import Cell
from bench._store import find_model_version
from bench._wrk import find_wrk, run_wrk
from bench.ray_bench import _pick_sample

__all__ = ["main"]

_ROOT = Path(__file__).resolve().parent.parent
_HOST = "127.0.0.1"
_ORDER = ("fermion-local", "fermion-remote")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.remote_bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--store", type=Path, default=Path(os.environ.get("STORE", "model_store")))
    parser.add_argument("--model", default="digits")
    parser.add_argument("--duration", type=int, default=int(os.environ.get("DURATION", "10")))
    parser.add_argument("--warmup", type=int, default=3, help="seconds of load before each cell")
    parser.add_argument("--quick", action="store_true", help="4 s cells, 2 s warm-ups")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each cell, wait up to this many seconds for other processes to idle",
    )
    parser.add_argument("--concurrency", default="1,64", help="comma-separated, default 1,64")
    parser.add_argument(
        "--fermion", default=str(Path(sys.executable).with_name("fermion")), help="fermion CLI"
    )
    parser.add_argument(
        "--out", type=Path, default=_ROOT / "bench" / "results" / "remote.json", help="results"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 4, 2
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    return args


def _server(
    name: str, args: argparse.Namespace, config: str, store: Path, work: Path
) -> ServerProcess:
    port = free_port()
    path = work / f"{name}.yaml"
    path.write_text(config)
    argv = [args.fermion, "serve", "--store", str(store), "--config", str(path)]
    argv += ["--host", _HOST, "--port", str(port), "--grpc-port", "off"]
    return ServerProcess(name, argv, f"http://{_HOST}:{port}", work / f"{name}.log")


def _measure(
    server: ServerProcess, payload: Payload, body: Path, conc: int, args: Any, wrk: str
) -> Cell:
    url = f"{server.base_url}/v2/models/{args.model}/infer"
    cell = Cell(server.name, payload.kind, conc)
    try:
        run_wrk(wrk, url, payload, body, connections=conc, threads=1, duration_s=args.warmup)
        cpu0, ticks0 = cpu_seconds(server.pid), machine_ticks()
        started = time.monotonic()
        cell.result = run_wrk(
            wrk, url, payload, body, connections=conc, threads=1, duration_s=args.duration
        )
        wall = time.monotonic() - started
        cell.server_cpu = (cpu_seconds(server.pid) - cpu0) / wall
        cell.machine_busy = cores_between(ticks0, machine_ticks()).busy
    except RuntimeError as exc:
        cell.error = str(exc)
    return cell


def _table(cells: list[Cell]) -> str:
    alone = {(c.body, c.concurrency): c.result for c in cells if c.server == "fermion-local"}
    head = (
        f"{'server':<15} {'body':<6} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'req/s/local':>11} {'p50 added':>9} {'srv CPU':>7} {'machine':>7} {'errors':>6}"
    )
    lines = [head, "-" * len(head)]
    for c in cells:
        r = c.result
        if r is None:
            lines.append(f"{c.server:<15} {c.body:<6} {c.concurrency:>4}  not run: {c.error}")
            continue
        a = alone.get((c.body, c.concurrency))
        ratio = f"{r.rps / a.rps:.2f}x" if a else "-"
        added = f"{r.ms('p50') - a.ms('p50'):+.2f}" if a else "-"
        lines.append(
            f"{c.server:<15} {c.body:<6} {c.concurrency:>4} {r.rps:>8.0f} {r.ms('p50'):>8.2f} "
            f"{r.ms('p99'):>8.2f} {ratio:>11} {added:>9} {c.server_cpu:>6.0%} "
            f"{c.machine_busy:>6.0%} {sum(r.errors.values()):>6}"
        )
    lines.append(
        "srv CPU: that gateway's process alone (the remote cell also loads the local one); "
        "machine: all cores."
    )
    return "\n".join(lines)


def _summary(cells: list[Cell], low: int, high: int) -> list[dict[str, Any]]:
    by = {(c.server, c.body, c.concurrency): c.result for c in cells}
    rows = []
    for kind in sorted({c.body for c in cells}):
        lo_a, lo_r = by.get(("fermion-local", kind, low)), by.get(("fermion-remote", kind, low))
        hi_a, hi_r = by.get(("fermion-local", kind, high)), by.get(("fermion-remote", kind, high))
        rows.append(
            {
                "body": kind,
                f"c{low}_p50_added_ms": lo_r.ms("p50") - lo_a.ms("p50") if lo_a and lo_r else None,
                f"c{high}_rps_ratio": hi_r.rps / hi_a.rps if hi_a and hi_r else None,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; non-zero only when the run itself was not valid."""
    args = _parse_args(argv)
    wrk = find_wrk()
    model = find_model_version(args.store, args.model)
    sample, expected = _pick_sample(model)
    payloads = [
        json_payload(model.input_name, sample),
        binary_payload(model.input_name, model.output_name, sample),
    ]
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="fermion-remote-bench-") as tmp:
        work = Path(tmp)
        local_config = f"models:\n  {args.model}: {{versions: [{model.version}]}}\n"
        local = _server("fermion-local", args, local_config, args.store, work)
        local.start()
        servers = [local]
        try:
            local.wait_ready()
            remote_config = (
                "backend: remote\n"
                f"remote: {{urls: [{local.base_url}], version: '{model.version}'}}\n"
                f"models:\n  {args.model}: {{versions: [{model.version}]}}\n"
            )
            remote = _server("fermion-remote", args, remote_config, work / "empty-store", work)
            remote.start()
            servers.append(remote)
            remote.wait_ready()
            for server in servers:
                url = f"{server.base_url}/v2/models/{args.model}/infer"
                for payload in payloads:
                    answer = check_answer(url, payload, model.output_name, expected)
                    if answer.error is not None:
                        raise RuntimeError(f"{server.name}: wrong answer: {answer.error}")
            for payload in payloads:
                body = work / f"body-{payload.kind}"
                body.write_bytes(payload.body)
                for conc in args.concurrency:
                    for server in servers:
                        others = wait_quiet(args.wait_quiet, 0.25)
                        print(
                            f".. {server.name} {payload.kind} c={conc} "
                            f"(other processes: {others:.0%} of a core)",
                            flush=True,
                        )
                        cells.append(_measure(server, payload, body, conc, args, wrk))
        finally:
            for server in reversed(servers):
                server.stop()
    low, high = min(args.concurrency), max(args.concurrency)
    summary = _summary(cells, low, high)
    print()
    print(_table(cells))
    print()
    for row in summary:
        added, ratio = row[f"c{low}_p50_added_ms"], row[f"c{high}_rps_ratio"]
        print(
            f"{row['body']}: the hop adds {added:+.2f} ms to p50 at c={low}; "
            f"remote/local req/s at c={high}: {ratio:.2f}x"
            if added is not None and ratio is not None
            else f"{row['body']}: not measured"
        )
    record = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": model.name, "version": model.version},
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "cores": os.cpu_count()},
        "cells": [c.record(None) for c in cells],
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 1 if any(c.result is None or any(c.result.errors.values()) for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
