"""Workers and fleet-wide limits, measured side by side in one run.

    python -m bench.fleet_bench --store model_store [--duration 10] [--concurrency 64]

One run starts a real ``redis-server`` on a free loopback port and, one after
another on the same cores, these servers, each driven by wrk (one thread, the same
V2 JSON body) for ``--duration`` seconds after a warm-up:

- ``bare``: the twenty-line Starlette + ONNX Runtime endpoint (bench/bare_endpoint.py);
- ``workers-1`` and ``workers-2``: ``fermion serve --workers 1|2`` on the Redis store;
- ``limit-none``, ``limit-memory``, ``limit-redis``: one worker without a rate-limit
  rule, with one (never refusing: a high rate) kept in process, and with the same rule
  fleet-wide in Redis (tokens leased in batches).

It prints req/s, p50 and p99 per server, the ratio of two workers to one (the goal on
a 2-core machine that wrk shares: 1.5x or more) and what a fleet-wide limit adds to
p50 and p99. ``bench/results/fleet.json`` keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._payloads import json_payload
from bench._procs import ServerProcess, free_port, wait_quiet
from bench._store import find_model_version, load_samples
from bench._wrk import WrkResult, find_wrk, run_wrk

_HOST = "127.0.0.1"
_ROOT = Path(__file__).resolve().parents[1]
#: A rule that never refuses at these loads; what it costs is the question.
_RULE = "limits: {rate_limits: [{models: '*', rate: 1000000, burst: 1000000}]}"


def _redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed: run `make redis` (apt-get)")
    port = free_port()
    with (workdir / "redis.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", _HOST, "--save", "", "--appendonly", "no"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    time.sleep(0.5)
    return proc, f"redis://{_HOST}:{port}/0"


def _fermion(name: str, args: argparse.Namespace, workdir: Path, config: str) -> ServerProcess:
    port = free_port()
    path = workdir / f"{name}.yaml"
    path.write_text(config)
    argv = [sys.executable, "-m", "serving.cli", "serve", "--store", str(args.store)]
    argv += ["--host", _HOST, "--port", str(port), "--grpc-port", "off", "--config", str(path)]
    return ServerProcess(name, argv, f"http://{_HOST}:{port}", workdir / f"{name}.log")


def _servers(args: argparse.Namespace, workdir: Path, redis_url: str) -> list[ServerProcess]:
    port = free_port()
    bare = [sys.executable, "-m", "bench.bare_endpoint", "--store", str(args.store)]
    bare += ["--model", args.model, "--host", _HOST, "--port", str(port)]
    shared = f"control: {{store: '{redis_url}'}}"
    return [
        ServerProcess("bare", bare, f"http://{_HOST}:{port}", workdir / "bare.log"),
        _fermion("workers-1", args, workdir, f"server: {{workers: 1}}\n{shared}\n"),
        _fermion("workers-2", args, workdir, f"server: {{workers: 2}}\n{shared}\n"),
        _fermion("limit-none", args, workdir, ""),
        _fermion("limit-memory", args, workdir, f"{_RULE}\n"),
        _fermion("limit-redis", args, workdir, f"{_RULE}\n{shared}\n"),
    ]


def _measure(server: ServerProcess, args: argparse.Namespace, wrk: str, body: Path) -> WrkResult:
    payload = json_payload(args.input_name, args.sample)
    body.write_bytes(payload.body)
    url = f"{server.base_url}/v2/models/{args.model}/infer"
    common: dict[str, Any] = {"connections": args.concurrency, "threads": 1}
    run_wrk(wrk, url, payload, body, duration_s=args.warmup, **common)
    busy = wait_quiet(60.0, 0.3)  # other processes' cores, lest they take the cell's
    if busy > 0.3:
        print(f"  ({server.name}: other processes kept {busy:.1f} cores busy)", flush=True)
    result = run_wrk(wrk, url, payload, body, duration_s=args.duration, **common)
    if any(result.errors.values()):
        raise RuntimeError(f"{server.name}: wrk saw errors {result.errors}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 unless the run itself is not valid."""
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_bench", description=__doc__)
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--model", default="digits")
    parser.add_argument("--duration", type=int, default=10, help="seconds per cell")
    parser.add_argument("--warmup", type=int, default=2, help="seconds before each cell")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    model = find_model_version(args.store, args.model)
    samples, _ = load_samples(model, 1)
    args.sample, args.input_name = samples[:1], model.input_name
    wrk = find_wrk()
    workdir = Path(tempfile.mkdtemp(prefix="fermion-fleet-bench-"))
    body = workdir / "body"
    redis, redis_url = _redis(workdir)
    results: dict[str, WrkResult] = {}
    try:
        for server in _servers(args, workdir, redis_url):
            server.start()
            try:
                server.wait_ready()
                if server.name == "workers-2":
                    time.sleep(3)  # the second worker loads its replicas too
                results[server.name] = _measure(server, args, wrk, body)
            finally:
                server.stop()
            r = results[server.name]
            print(
                f"{server.name:13} {r.rps:9.0f} req/s   p50 {r.ms('p50'):7.2f} ms"
                f"   p99 {r.ms('p99'):7.2f} ms",
                flush=True,
            )
    finally:
        redis.terminate()
        redis.wait(timeout=10)
    one, two = results["workers-1"], results["workers-2"]
    ratio = two.rps / one.rps
    print(f"\nworkers 2 / workers 1: {ratio:.2f}x req/s (goal >= 1.5x); "
          f"bare: {results['bare'].rps:.0f} req/s")  # fmt: skip
    none = results["limit-none"]
    for name in ("limit-memory", "limit-redis"):
        r = results[name]
        print(
            f"{name}: p50 {r.ms('p50') - none.ms('p50'):+.2f} ms, "
            f"p99 {r.ms('p99') - none.ms('p99'):+.2f} ms, "
            f"req/s {r.rps / none.rps:.2f}x of no rule"
        )
    out = _ROOT / "bench" / "results" / "fleet.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        name: {"rps": r.rps, "p50_ms": r.ms("p50"), "p99_ms": r.ms("p99")}
        for name, r in results.items()
    }
    record["workers_ratio"] = {"value": ratio, "goal": 1.5}
    out.write_text(json.dumps(record, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
