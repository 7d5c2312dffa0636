"""``fermion loadtest``: run a load test, compare two reports, or join one as a worker.

Imported by ``serving.cli`` only when ``loadtest`` is the command; it never imports locust
(locust runs in subprocesses).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.compare import compare, format_comparison, load_summary
from loadtest.profiles import SHAPES
from loadtest.runner import (
    EXIT_SLO_MISSED,
    LoadTestError,
    LoadTestOptions,
    LoadTestResult,
    run_loadtest,
    worker_command,
)
from loadtest.slo import parse_slos
from serving.durations import parse_duration

__all__ = ["add_loadtest_parser", "format_result"]

#: ``--url`` when none is given, by ``--protocol``.
_DEFAULT_URLS = {"http": "http://127.0.0.1:8000", "grpc": "grpc://127.0.0.1:8001"}


def format_result(result: LoadTestResult) -> str:
    """A few lines for the terminal: throughput, latency, versions, errors, SLOs, files."""
    s = result.summary
    lat = s["latency_ms"]
    lines = [
        f"requests {s['requests']} ({s['failures']} failed, {s['error_rate'] * 100:.3g}%) "
        f"in {s['duration_s']:.1f}s: {s['rps']:.1f} requests/s",
    ]
    if lat:
        lines.append(
            "latency ms: "
            + "  ".join(f"{k} {lat[k]:.3g}" for k in ("p50", "p90", "p95", "p99", "p99.9", "max"))
        )
    if s["versions"]:
        lines.append(
            "versions: "
            + "  ".join(
                f"v{v} {row['share'] * 100:.1f}% (p99 {row['latency_ms'].get('p99', 0):.3g}ms)"
                for v, row in s["versions"].items()
            )
        )
    lines += [f"error: {e['status']} {e['message']}: {e['count']}" for e in s["errors"][:10]]
    lines += [f"SLO {r.line()}" for r in result.slo_results]
    out = result.out
    lines.append(f"report: {out / 'report.html'} (summary.json, history.csv in {out})")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if not args.model:
        print("fermion loadtest: --model is required", file=sys.stderr)
        return 2
    try:
        slos = parse_slos(args.slo or "")
        duration = parse_duration(args.duration)
    except ValueError as e:
        print(f"fermion loadtest: {e}", file=sys.stderr)
        return 2
    for name, value in (("--users", args.users), ("--workers", args.workers)):
        if value < 1:
            print(f"fermion loadtest: {name} must be at least 1", file=sys.stderr)
            return 2
    out = args.out or Path("loadtest-reports") / f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    opts = LoadTestOptions(
        url=args.url or _DEFAULT_URLS[args.protocol],
        protocol=args.protocol,
        model=args.model,
        out=out,
        users=args.users,
        spawn_rate=args.spawn_rate or float(args.users),
        duration_s=duration,
        shape=args.shape,
        steps=args.steps,
        binary=args.binary,
        batch_size=args.batch_size,
        model_version=args.model_version,
        samples=args.samples,
        store=args.store,
        user_rps=args.user_rps,
        api_key_env=args.api_key_env,
        slos=slos,
        workers=args.workers,
        remote_workers=args.remote_workers,
        master_bind=args.master_bind,
        master_port=args.master_port,
    )
    try:
        result = run_loadtest(opts, echo=lambda line: print(line, flush=True))
    except LoadTestError as e:
        print(f"fermion loadtest: {e}", file=sys.stderr)
        return 2
    print(format_result(result), flush=True)
    missed = result.slo_missed
    if missed:
        names = ", ".join(r.line().removeprefix("MISSED ") for r in missed)
        print(f"fermion loadtest: SLO missed: {names}", file=sys.stderr)
        return EXIT_SLO_MISSED
    return 0


def _compare(args: argparse.Namespace) -> int:
    try:
        a, b = load_summary(args.a), load_summary(args.b)
    except ValueError as e:
        print(f"fermion loadtest compare: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([d.to_dict() for d in compare(a, b)], indent=2))
    else:
        print(format_comparison(a, b, (str(args.a), str(args.b))))
    return 0


def _worker(args: argparse.Namespace) -> int:
    return subprocess.call(worker_command(args.worker_master_host, args.worker_master_port))


def add_loadtest_parser(sub: Any) -> None:
    """Add ``loadtest`` (with ``compare`` and ``worker``) to the ``fermion`` subcommands."""
    p = sub.add_parser(
        "loadtest",
        help="load-test a gateway with locust: report with charts, SLO gate",
        description="Run locust headless against a Fermion gateway and write a report folder "
        "(summary.json, history.csv, report.html). Exits 1 when an --slo is missed.",
    )
    p.add_argument(
        "--url",
        help="the gateway: base URL (http://127.0.0.1:8000) or, with --protocol grpc, its "
        "gRPC address (grpc://127.0.0.1:8001)",
    )
    p.add_argument(
        "--protocol",
        choices=["http", "grpc"],
        default="http",
        help="V2 over HTTP (JSON, or --binary) or over gRPC (raw tensors)",
    )
    p.add_argument("--model", help="model to load-test")
    p.add_argument("--model-version", help="pin one version (default: what the gateway routes)")
    p.add_argument("--users", type=int, default=10, help="simulated users (peak for shapes)")
    p.add_argument("--spawn-rate", type=float, help="users started per second (default: all)")
    p.add_argument("--duration", default="60s", help="length of the test (60s, 2m, 1m30s)")
    p.add_argument("--shape", choices=SHAPES, default="steady", help="load profile")
    p.add_argument("--steps", type=int, default=4, help="plateaus of --shape step")
    p.add_argument("--binary", action="store_true", help="binary tensor bodies instead of JSON")
    p.add_argument("--batch-size", type=int, default=1, help="rows per request")
    p.add_argument("--samples", type=Path, help=".npz of real inputs, one array per input")
    p.add_argument("--store", type=Path, help="model store to take the model's samples from")
    p.add_argument("--user-rps", type=float, default=0.0, help="cap per user (0: no pause)")
    p.add_argument(
        "--api-key-env",
        default="FERMION_API_KEY",
        help="environment variable holding the API key (sent as Bearer)",
    )
    p.add_argument("--slo", help='objectives, e.g. "p99<50ms,errors<0.1%%,rps>100"')
    p.add_argument("--workers", type=int, default=1, help="local locust workers (>1: distributed)")
    p.add_argument(
        "--remote-workers", type=int, default=0, help="also wait for this many remote workers"
    )
    p.add_argument(
        "--master-bind", default="127.0.0.1", help="master address (0.0.0.0 for remote workers)"
    )
    p.add_argument("--master-port", type=int, help="master port (default: a free one)")
    p.add_argument("--out", type=Path, help="report folder (default: loadtest-reports/...)")
    p.set_defaults(func=_run)

    lsub = p.add_subparsers(dest="loadtest_command", required=False, metavar="{compare,worker}")
    c = lsub.add_parser("compare", help="two reports side by side, with deltas")
    c.add_argument("a", type=Path, help="report folder (or summary.json), e.g. before")
    c.add_argument("b", type=Path, help="report folder (or summary.json), e.g. after")
    c.add_argument("--json", action="store_true", help="print the deltas as JSON")
    c.set_defaults(func=_compare)
    w = lsub.add_parser("worker", help="join a distributed load test as a locust worker")
    w.add_argument(
        "--master-host", dest="worker_master_host", required=True, help="the master's address"
    )
    w.add_argument(
        "--master-port", dest="worker_master_port", type=int, default=5557, help="its port"
    )
    w.set_defaults(func=_worker)
