"""``fermion loadtest``: run a load test (open loop with ``--rate``, else locust users),
search the capacity, replay a capture, compare two reports, or join a run as a worker.

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

from loadtest.compare import DEFAULT_NOISE, compare, format_comparison, load_summary
from loadtest.profiles import SHAPES
from loadtest.progress import ProgressLine
from loadtest.rates import ARRIVALS, parse_rate, parse_rate_value
from loadtest.replay import parse_speed
from loadtest.report_sections import generator_warning, server_verdicts
from loadtest.runner import (
    EXIT_SLO_MISSED,
    LoadTestError,
    LoadTestOptions,
    LoadTestResult,
    run_loadtest,
    worker_command,
)
from loadtest.slo import parse_slos
from loadtest.summary import number
from loadtest.transport import TRANSPORTS
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
            + "  ".join(
                f"{k} {number(lat[k])}" for k in ("p50", "p90", "p95", "p99", "p99.9", "max")
            )
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
    generator = s.get("generator")
    if generator:
        lag = generator["lag_ms"]
        lines.append(
            f"generator: sent {generator['sent']} of {generator['scheduled']} "
            f"({generator['achieved_rate']:.1f}/s of {generator['target_rate']:.1f}/s planned), "
            f"lag p99 {number(lag['p99'] or 0)}ms, max {number(lag['max'] or 0)}ms"
        )
        warning = generator_warning(generator)
        if warning:
            lines.append(f"WARNING: {warning}")
    server = s.get("server")
    if server:
        for name, row in server["versions"].items():
            q, c, b = row["queue_ms"], row["compute_ms"], row["batch_size"]
            lines.append(
                f"server {name}: {row['requests']} requests, queue p50/p99 "
                f"{number(q['p50'] or 0)}/{number(q['p99'] or 0)}ms, compute p50/p99 "
                f"{number(c['p50'] or 0)}/{number(c['p99'] or 0)}ms, "
                f"mean batch {b['mean'] or 0:.3g}"
            )
        lines += [f"server: {v}" for v in server_verdicts(server)]
        lines += [
            f"server rejected ({r['model'] or '-'}): {r['reason']}: {r['count']}"
            for r in server["rejected"]
        ]
        lines += [
            f"shadow {r['model']} v{r['primary']}->v{r['shadow']}: {r['outcome']} {r['count']}"
            for r in server["shadow"]
        ]
        lines += [
            f"server metrics unavailable: {g['error']}" for g in server["gateways"] if not g["ok"]
        ]
    lines += [f"SLO {r.line()}" for r in result.slo_results]
    out = result.out
    lines.append(f"report: {out / 'report.html'} (summary.json, history.csv in {out})")
    return "\n".join(lines)


def _fail(command: str, message: str) -> int:
    print(f"fermion {command}: {message}", file=sys.stderr)
    return 2


def _options(args: argparse.Namespace, name: str) -> LoadTestOptions:
    """The options shared by a run, a capacity search and a replay (ValueError if bad)."""
    for flag, value in (("--workers", args.workers), ("--max-connections", args.max_connections)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1")
    if args.protocol not in TRANSPORTS:
        raise ValueError(f"unknown --protocol {args.protocol!r}")
    urls = [u.rstrip("/") for u in (args.url or [_DEFAULT_URLS[args.protocol]])]
    out = args.out or Path("loadtest-reports") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return LoadTestOptions(
        url=urls[0],
        urls=urls,
        model=getattr(args, "model", None) or "",
        model_version=getattr(args, "model_version", None),
        out=out,
        binary=getattr(args, "binary", False),
        batch_size=getattr(args, "batch_size", 1),
        samples=getattr(args, "samples", None),
        store=getattr(args, "store", None),
        api_key_env=args.api_key_env,
        slos=parse_slos(getattr(args, "slo", None) or ""),
        workers=args.workers,
        protocol=args.protocol,
        max_connections=args.max_connections,
        timeout_s=parse_duration(args.timeout),
        metrics_urls=args.metrics_url,
        arrival=getattr(args, "arrival", "uniform"),
    )


def _progress(target: Any = None) -> ProgressLine:
    return ProgressLine(sys.stderr, target)


def _finish(result: LoadTestResult) -> int:
    print(format_result(result), flush=True)
    missed = result.slo_missed
    if missed:
        names = ", ".join(r.line().removeprefix("MISSED ") for r in missed)
        print(f"fermion loadtest: SLO missed: {names}", file=sys.stderr)
        return EXIT_SLO_MISSED
    return 0


def _run(args: argparse.Namespace) -> int:
    if not args.model:
        return _fail("loadtest", "--model is required")
    try:
        opts = _options(args, args.model)
        opts.duration_s = parse_duration(args.duration)
        if args.users < 1:
            raise ValueError("--users must be at least 1")
        plan = parse_rate(args.rate, opts.duration_s) if args.rate else None
    except ValueError as e:
        return _fail("loadtest", str(e))
    opts.users = args.users
    opts.spawn_rate = args.spawn_rate or float(args.users)
    opts.shape, opts.steps, opts.user_rps = args.shape, args.steps, args.user_rps
    opts.remote_workers, opts.master_bind = args.remote_workers, args.master_bind
    opts.master_port = args.master_port
    if plan is not None:
        opts.rate = args.rate
        opts.duration_s = plan.duration_s
    try:
        result = run_loadtest(
            opts,
            echo=lambda line: print(line, flush=True),
            progress=_progress(plan.rate_at if plan else None),
        )
    except LoadTestError as e:
        return _fail("loadtest", str(e))
    return _finish(result)


def _replay(args: argparse.Namespace) -> int:
    try:
        opts = _options(args, "replay")
        opts.replay = args.capture
        opts.speed = parse_speed(args.speed)
    except ValueError as e:
        return _fail("loadtest replay", str(e))
    if opts.protocol != "http":
        return _fail("loadtest replay", "captures are HTTP requests: --protocol http")
    try:
        result = run_loadtest(opts, echo=lambda line: print(line, flush=True), progress=_progress())
    except LoadTestError as e:
        return _fail("loadtest replay", str(e))
    return _finish(result)


def _capacity(args: argparse.Namespace) -> int:
    from loadtest.capacity import format_capacity
    from loadtest.capacity_runner import CapacityOptions, run_capacity

    if not args.model:
        return _fail("loadtest capacity", "--model is required")
    try:
        opts = _options(args, f"{args.model}-capacity")
        slos = parse_slos(args.slo)
        if args.error_rate:
            slos += parse_slos(f"errors<{args.error_rate}")
        precision = float(args.precision.rstrip("%")) / (100 if args.precision.endswith("%") else 1)
        copts = CapacityOptions(
            slos=slos,
            min_rate=parse_rate_value(args.min_rate),
            max_rate=parse_rate_value(args.max_rate),
            start_rate=parse_rate_value(args.start_rate),
            precision=precision,
            warmup_s=parse_duration(args.warmup),
            probe_s=parse_duration(args.probe),
        )
    except ValueError as e:
        return _fail("loadtest capacity", str(e))
    try:
        result = run_capacity(
            opts,
            copts,
            echo=lambda line: print(line, flush=True),
            progress=lambda rate: _progress(lambda _t: rate),
        )
    except (LoadTestError, ValueError) as e:
        return _fail("loadtest capacity", str(e))
    print(format_capacity(result, ",".join(s.text for s in slos)), flush=True)
    print(f"report: {opts.out / 'capacity.html'} (capacity.json in {opts.out})", flush=True)
    return 0 if result.capacity is not None else EXIT_SLO_MISSED


def _compare(args: argparse.Namespace) -> int:
    try:
        a, b = load_summary(args.a), load_summary(args.b)
        noise = float(args.noise.rstrip("%")) / 100
    except ValueError as e:
        return _fail("loadtest compare", str(e))
    if args.json:
        print(json.dumps([d.to_dict() for d in compare(a, b, noise)], indent=2))
    else:
        print(format_comparison(a, b, (str(args.a), str(args.b)), noise))
    return 0


def _worker(args: argparse.Namespace) -> int:
    return subprocess.call(worker_command(args.worker_master_host, args.worker_master_port))


def _target_options(p: argparse.ArgumentParser, model: bool = True) -> None:
    """Where the load goes and how it is sent (shared by run, capacity and replay)."""
    p.add_argument(
        "--url",
        action="append",
        help=f"a gateway's base URL (default {_DEFAULT_URLS['http']}) or, with --protocol grpc, "
        f"its gRPC address (default {_DEFAULT_URLS['grpc']}); repeat for a fleet: open-loop "
        "requests go round-robin and every gateway's /metrics is read",
    )
    if model:
        p.add_argument("--model", help="model to load-test")
        p.add_argument("--model-version", help="pin one version (default: what the gateway routes)")
        p.add_argument("--binary", action="store_true", help="binary tensor bodies instead of JSON")
        p.add_argument("--batch-size", type=int, default=1, help="rows per request")
        p.add_argument("--samples", type=Path, help=".npz of real inputs, one array per input")
        p.add_argument("--store", type=Path, help="model store to take the model's samples from")
        p.add_argument(
            "--arrival", choices=ARRIVALS, default="uniform", help="open loop: request spacing"
        )
    p.add_argument(
        "--protocol",
        choices=sorted(TRANSPORTS),
        default="http",
        help="V2 over HTTP (JSON, or --binary) or over gRPC (raw tensors)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="local load generator processes (open loop: each sends 1/N of the rate)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=1000,
        help="open loop: connections per gateway at most, gRPC: calls in flight (requests "
        "beyond wait, timed)",
    )
    p.add_argument("--timeout", default="30s", help="open loop: a request's answer timeout")
    p.add_argument(
        "--metrics-url",
        action="append",
        help="a /metrics URL to read around the run (default: each HTTP --url's; none for "
        "gRPC addresses); repeat for a fleet",
    )
    p.add_argument(
        "--api-key-env",
        default="FERMION_API_KEY",
        help="environment variable holding the API key (sent as Bearer)",
    )
    p.add_argument("--out", type=Path, help="report folder (default: loadtest-reports/...)")


def add_loadtest_parser(sub: Any) -> None:
    """Add ``loadtest`` (with capacity, replay, compare and worker) to the subcommands."""
    p = sub.add_parser(
        "loadtest",
        help="load-test a gateway: open loop (--rate) or locust users; capacity, replay",
        description="Load-test a Fermion gateway and write a report folder (summary.json, "
        "history.csv, report.html). With --rate, an open-loop engine sends requests on a "
        "schedule and measures latency from each one's intended send time; without, locust "
        "users run closed loop. Exits 1 when an --slo is missed, 2 when the test cannot run.",
    )
    _target_options(p)
    p.add_argument(
        "--rate",
        help="open loop: arrival rate, e.g. 2000/s; steps 100/s,200/s; ramp 100/s..1000/s; "
        "segment lengths 50/s:10s,500/s:20s",
    )
    p.add_argument("--users", type=int, default=10, help="locust: simulated users (peak)")
    p.add_argument("--spawn-rate", type=float, help="locust: users started per second")
    p.add_argument("--duration", default="60s", help="length of the test (60s, 2m, 1m30s)")
    p.add_argument("--shape", choices=SHAPES, default="steady", help="locust: load profile")
    p.add_argument("--steps", type=int, default=4, help="locust: plateaus of --shape step")
    p.add_argument("--user-rps", type=float, default=0.0, help="locust: cap per user (0: none)")
    p.add_argument("--slo", help='objectives, e.g. "p99<50ms,errors<0.1%%,rps>100"')
    p.add_argument(
        "--remote-workers", type=int, default=0, help="locust: also wait for M remote workers"
    )
    p.add_argument(
        "--master-bind", default="127.0.0.1", help="master address (0.0.0.0 for remote workers)"
    )
    p.add_argument("--master-port", type=int, help="master port (default: a free one)")
    p.set_defaults(func=_run)

    lsub = p.add_subparsers(
        dest="loadtest_command", required=False, metavar="{capacity,replay,compare,worker}"
    )
    cap = lsub.add_parser(
        "capacity",
        help="the highest sustained rate that meets an SLO",
        description="Probe constant open-loop rates (warm-up, then a measured window) to find "
        "the highest one that meets --slo, within --precision. Writes capacity.json and "
        "capacity.html (rate vs p50/p99). Exits 1 when no rate meets it.",
    )
    _target_options(cap)
    cap.add_argument("--slo", required=True, help='latency objective(s), e.g. "p99<50ms"')
    cap.add_argument("--error-rate", default="0.1%", help="most errors allowed (default 0.1%%)")
    cap.add_argument("--start-rate", default="100/s", help="first rate probed")
    cap.add_argument("--min-rate", default="1/s", help="lowest rate probed")
    cap.add_argument("--max-rate", default="100000/s", help="highest rate probed")
    cap.add_argument("--precision", default="5%", help="relative precision of the answer")
    cap.add_argument("--warmup", default="5s", help="each probe's warm-up (not judged)")
    cap.add_argument("--probe", default="20s", help="each probe's measured window")
    cap.set_defaults(func=_capacity)

    rep = lsub.add_parser(
        "replay",
        help="replay a gateway's captured requests with their original timing",
        description="Send the requests of a capture file (or of every *.jsonl in a folder) "
        "in their order, with their original inter-arrival times divided by --speed, and "
        "report as a run does.",
    )
    rep.add_argument("capture", type=Path, help="capture file or folder")
    _target_options(rep, model=False)
    rep.add_argument("--speed", default="1x", help="time compression, e.g. 2x (default 1x)")
    rep.add_argument("--slo", help='objectives, e.g. "p99<50ms,errors<0.1%%"')
    rep.set_defaults(func=_replay)

    c = lsub.add_parser("compare", help="two reports side by side, with deltas")
    c.add_argument("a", type=Path, help="report folder (or summary.json), e.g. before")
    c.add_argument("b", type=Path, help="report folder (or summary.json), e.g. after")
    c.add_argument(
        "--noise",
        default=f"{DEFAULT_NOISE * 100:g}%",
        help="smallest relative change called better/worse (raised to the runs' own "
        "second-to-second spread where that is larger)",
    )
    c.add_argument("--json", action="store_true", help="print the deltas as JSON")
    c.set_defaults(func=_compare)
    w = lsub.add_parser("worker", help="join a distributed locust run as a worker")
    w.add_argument(
        "--master-host", dest="worker_master_host", required=True, help="the master's address"
    )
    w.add_argument(
        "--master-port", dest="worker_master_port", type=int, default=5557, help="its port"
    )
    w.set_defaults(func=_worker)
