"""Tail latency and hop costs: Fermion's p99 against its own p50, next to a bare endpoint.

One run starts the bare endpoint (``bench/bare_endpoint.py``) and Fermion in the
measured configuration, and with ``--base`` a second Fermion from another checkout
(the code before a change), then drives every cell with wrk (one thread) in passes:
each pass measures every server, body and concurrency once, interleaved, so that a
slow minute of a shared machine falls on all of them. With ``--ray`` the same passes
then run Fermion on backend ray beside Fermion local (with ``--ray-autoscaling``,
as an autoscaling deployment held at one replica). Figures are medians over the
passes; every ratio is taken within a pass, then its median printed against the
issue's targets. ``--check`` exits 1 when a target is missed (a regression guard
for a person to run, not a test).

The measured configuration (``--features guarded``, the default) keeps on what a
production gateway runs with: API key auth (every request carries a key), a
deadline on every request (``limits.default_timeout_ms``), two priority levels, a
shadow route (1% of requests mirrored to another version, with its isolation
bounds) and tracing (OTLP over HTTP to a sink in this process, 1% of requests
sampled; ``--sample-ratio`` sets another share). ``--features default`` measures
``fermion serve``'s defaults instead, and a comma-separated subset of
``auth,deadline,priorities,shadow,tracing`` only those (to find what one feature
costs). ``--base-features`` gives the base another configuration: with no ``--base``
the base is this checkout's own CLI, so that ``--base-features default`` measures
what the guarded features cost, in the same passes; a comparison then prints, per
body and concurrency, the per-pass req/s ratios and each side's server CPU per
request.

``--probe DIR`` adds one probed cell per Fermion (JSON, c=64 or
``--probe-concurrency``): the gateway runs under ``bench/_probe.py`` (cycle
collections, event-loop lag, per-request server time), and DIR gets the records and
``timeline.svg``. ``--host-lateness`` prints, per cell, how often a sleeping process
beside the run woke over 1 ms late (``bench/_host_lateness.py``): the machine's slow
windows, which decide the c=1 medians on a shared VM.

    .venv/bin/python -m bench.tail_bench --store model_store [--passes 3] [--duration 15]
        [--base ../main/.venv/bin/fermion] [--base-features default] [--ray [--ray-autoscaling]]
        [--probe DIR] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench._host_lateness import Lateness, host_lateness
from bench._otlp import SpanSink, span_sink
from bench._payloads import Payload, binary_payload, check_answer, json_payload
from bench._procs import (
    ServerProcess,
    busiest_others,
    cores_between,
    cpu_by_process,
    cpu_seconds,
    free_port,
    machine_ticks,
    tcp_retransmits,
    wait_quiet,
)
from bench._report import OTHER_CPU_MAX, Cell
from bench._store import ModelVersion, find_model_version, load_samples
from bench._timeline import render_svg, summarize
from bench._wrk import find_wrk, run_wrk

__all__ = ["TARGETS", "main"]

_ROOT = Path(__file__).resolve().parent.parent
_HOST = "127.0.0.1"
_API_KEY_HEADER = "x-api-key"

#: The issue's targets: (name, what is compared, bound, "max" or "min").
TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("c=64 json p99 / p50", "fermion-json:64:p99/p50", 2.0, "max"),
    ("c=64 json max / p50", "fermion-json:64:max/p50", 3.0, "max"),
    ("c=64 binary p99 / p50", "fermion-binary:64:p99/p50", 2.0, "max"),
    ("c=64 binary max / p50", "fermion-binary:64:max/p50", 3.0, "max"),
    ("c=64 json req/s / bare", "fermion-json:64:rps/bare", 2.0, "min"),
    ("c=64 binary req/s / bare", "fermion-binary:64:rps/bare", 2.0, "min"),
    ("c=1 json p99 / p50", "fermion-json:1:p99/p50", 1.5, "max"),
    ("c=1 binary p99 / p50", "fermion-binary:1:p99/p50", 1.5, "max"),
    ("c=64 binary req/s / json", "fermion-binary:64:rps/json", 1.5, "min"),
    ("c=64 ray req/s / local", "fermion-ray-json:64:rps/local", 0.6, "min"),
    ("c=64 ray p99 / local p99", "fermion-ray-json:64:p99/local", 2.0, "max"),
    ("c=1 ray p50 ms", "fermion-ray-json:1:p50", 2.0, "max"),
)


#: What ``--features guarded`` turns on; ``--features`` may name a subset.
FEATURES = ("auth", "deadline", "priorities", "shadow", "tracing")


def _features(text: str) -> frozenset[str]:
    """``--features``: guarded, default, or a comma-separated subset of FEATURES."""
    if text == "guarded":
        return frozenset(FEATURES)
    if text == "default":
        return frozenset()
    chosen = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = chosen - set(FEATURES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown feature(s): {', '.join(sorted(unknown))}")
    return chosen


def _ratio(text: str) -> float:
    """``--sample-ratio``: a share of requests, from 0 to 1."""
    try:
        ratio = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= ratio <= 1.0:
        raise argparse.ArgumentTypeError(f"a ratio is from 0 to 1, not {ratio}")
    return ratio


@dataclass
class _Server:
    """One server of the run and what it is sent."""

    process: ServerProcess
    bodies: list[str]
    headers: dict[str, str] = field(default_factory=dict)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tail_bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--store", type=Path, default=Path(os.environ.get("STORE", "model_store")))
    parser.add_argument("--model", default="digits")
    parser.add_argument("--duration", type=int, default=15, help="seconds per cell (15)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="seconds before each cell (2; 0: none)"
    )
    parser.add_argument("--passes", type=int, default=3, help="passes over every cell (3)")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated (1,64)")
    parser.add_argument(
        "--features",
        type=_features,
        default="guarded",
        help="guarded (all of " + ",".join(FEATURES) + "), default (none), or a subset",
    )
    parser.add_argument(
        "--fermion", default=str(Path(sys.executable).with_name("fermion")), help="fermion CLI"
    )
    parser.add_argument(
        "--base", help="the fermion CLI of another checkout, measured beside (label: base)"
    )
    parser.add_argument(
        "--base-features",
        type=_features,
        help="the base's features, as --features (default: the same); without --base, the "
        "base is this checkout's CLI",
    )
    parser.add_argument(
        "--inline-max-ms",
        type=float,
        default=0.0,
        help="local.inline_max_ms of this checkout's servers, not --base's (0, the default: off)",
    )
    parser.add_argument(
        "--sample-ratio",
        type=_ratio,
        default=0.01,
        help="the share of requests tracing samples, with feature tracing (0.01; 1: what "
        "tracing every request costs)",
    )
    parser.add_argument(
        "--export-process",
        action="store_true",
        help="this checkout's servers export traces from a child process "
        "(tracing.export_process), not --base's",
    )
    parser.add_argument("--no-bare", action="store_true", help="leave the bare endpoint out")
    parser.add_argument(
        "--host-lateness",
        action="store_true",
        help="run a 1 ms sleeper beside the passes and show how late it woke in each cell "
        "(the machine's slow windows; adds about 1000 wake-ups a second)",
    )
    parser.add_argument("--ray", action="store_true", help="then Fermion on backend ray")
    parser.add_argument(
        "--ray-autoscaling",
        action="store_true",
        help="the ray phase's deployments autoscale (1 to 2 replicas, held at 1 for the run "
        "by a 600 s upscale delay): what a hop costs an autoscaling deployment",
    )
    parser.add_argument("--probe", type=Path, help="probed JSON cells; records in DIR")
    parser.add_argument(
        "--probe-concurrency",
        type=int,
        default=64,
        help="the probed cells' concurrency (64)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each cell, wait up to this many seconds for other processes to go "
        "idle (60; 0: do not wait)",
    )
    parser.add_argument(
        "--wrk-nice",
        type=int,
        help="run wrk at this niceness (e.g. -10, ahead of the servers: is a tail the "
        "load generator's own wait for a core?)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--out", type=Path, default=_ROOT / "bench" / "results" / "tail.json", help="results"
    )
    args = parser.parse_args(argv)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    if args.base_features is None:
        args.base_features = args.features
    elif args.base is None:
        args.base = args.fermion
    return args


# -- configuration --------------------------------------------------------------------


def _config(
    features: frozenset[str],
    model: str,
    versions: list[int],
    backend: str,
    work: Path,
    traces: str,
    *,
    sample_ratio: float = 0.01,
    autoscaling: bool = False,
    name: str = "fermion",
) -> tuple[str, dict[str, str]]:
    """The YAML of a Fermion server (``name``: fermion or base) and the headers its
    requests carry."""
    lines = [f"backend: {backend}"]
    if backend == "ray" and autoscaling:
        scaling = "{min_replicas: 1, max_replicas: 2, upscale_delay_s: 600}"
        lines += [f"ray: {{deployment: {{num_cpus: 1, autoscaling: {scaling}}}}}"]
    elif backend == "ray":
        lines += ["ray: {deployment: {num_cpus: 1}}"]
    headers: dict[str, str] = {}
    if "auth" in features:
        from serving.auth import create_key

        # One keys file per server and backend: a key written for the ray phase, or for the
        # base, must not replace the one a gateway still serving was started with.
        keys = work / f"keys-{name}-{backend}.json"
        headers[_API_KEY_HEADER] = create_key(keys, "bench", ["infer:*", "read"], replace=True)
        lines += [f"auth: {{keys_file: {keys}}}"]
    if "deadline" in features:
        lines += ["limits: {default_timeout_ms: 10000}"]
    if "priorities" in features:
        lines += ["batching: {priority_levels: 2}"]
    if "tracing" in features:
        ratio = f"sample_ratio: {sample_ratio}"
        lines += [f"tracing: {{exporter: otlp-http, endpoint: '{traces}', {ratio}}}"]
    if "shadow" in features and len(versions) > 1:
        # The newest answers; 1% is mirrored to the one before.
        lines += [
            "routes:",
            f"  {model}:",
            f"    split: {{{versions[-1]}: 1}}",
            f"    shadow: {{version: {versions[-2]}, percent: 1}}",
        ]
    return "\n".join(lines) + "\n", headers


def _configs(
    args: argparse.Namespace,
    clis: list[tuple[str, str]],
    model: str,
    versions: list[int],
    backend: str,
    work: Path,
    traces: str,
) -> dict[str, tuple[str, dict[str, str]]]:
    """Each Fermion's ``_config`` on ``backend``: fermion's with --features, base's with
    --base-features."""
    return {
        name: _config(
            args.features if name == "fermion" else args.base_features,
            model,
            versions,
            backend,
            work,
            traces,
            sample_ratio=args.sample_ratio,
            autoscaling=backend == "ray" and args.ray_autoscaling,
            name=name,
        )
        for name, _ in clis
    }


def _features_note(
    features: frozenset[str], versions: list[int], sample_ratio: float = 0.01
) -> str:
    if not features:
        return "fermion serve's defaults (auth, tracing, priorities, route off)"
    notes = {
        "auth": "API key auth on every request",
        "deadline": "a 10 s deadline on every request",
        "priorities": "2 priority levels",
        "shadow": (
            f"shadow 1% to v{versions[-2]} (answers from v{versions[-1]})"
            if len(versions) > 1
            else "no shadow (one version)"
        ),
        "tracing": f"tracing OTLP/HTTP {sample_ratio * 100:g}% sampled",
    }
    return ", ".join(notes[f] for f in FEATURES if f in features) + "; metrics on"


# -- servers and cells ----------------------------------------------------------------


def _fermion(
    name: str, cli: str, args: argparse.Namespace, config: str, work: Path, wrapper: list[str]
) -> ServerProcess:
    port = free_port()
    path = work / f"{name}.yaml"
    if args.inline_max_ms and name.startswith("fermion"):  # not the base: its own defaults
        config += f"local: {{inline_max_ms: {args.inline_max_ms}}}\n"
    if args.export_process and name.startswith("fermion"):  # (a base may not know the key)
        config = config.replace("tracing: {", "tracing: {export_process: true, ", 1)
    path.write_text(config)
    argv = [*wrapper, "serve"] if wrapper else [cli, "serve"]
    argv += ["--store", str(args.store), "--config", str(path), "--grpc-port", "off"]
    argv += ["--host", _HOST, "--port", str(port)]
    return ServerProcess(name, argv, f"http://{_HOST}:{port}", work / f"{name}.log")


def _probe_wrapper(cli: str, out: Path) -> list[str]:
    """Run ``cli``'s gateway under ``bench/_probe.py`` (the Python beside ``cli``, this probe).

    A ``--base`` checkout without a venv of its own needs a ``python`` beside its CLI
    script that puts the checkout first on ``PYTHONPATH``.
    """
    python = Path(cli).with_name("python")
    return [str(python), str(Path(__file__).with_name("_probe.py")), "--out", str(out), "--"]


def _bare(args: argparse.Namespace, work: Path) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare_endpoint", "--store", str(args.store)]
    argv += ["--model", args.model, "--host", _HOST, "--port", str(port)]
    return ServerProcess("bare", argv, f"http://{_HOST}:{port}", work / "bare.log")


def _measure(
    server: _Server,
    url: str,
    payload: Payload,
    body: Path,
    conc: int,
    args: argparse.Namespace,
    wrk: str,
) -> Cell:
    cell = Cell(server.process.name, payload.kind, conc)
    common: dict[str, Any] = {
        "connections": conc,
        "threads": 1,
        "headers": server.headers,
        "nice": args.wrk_nice,
    }
    try:
        if args.warmup > 0:
            run_wrk(wrk, url, payload, body, duration_s=args.warmup, **common)
        cpu0, ticks0 = cpu_seconds(server.process.pid), machine_ticks()
        retx0, others0 = tcp_retransmits(), cpu_by_process()
        cell.started = started = time.monotonic()
        cell.result = run_wrk(wrk, url, payload, body, duration_s=args.duration, **common)
        cell.ended = time.monotonic()
        wall = cell.ended - started
        ticks1 = machine_ticks()
        cell.tcp_retransmits = tcp_retransmits() - retx0
        cell.other_top = busiest_others(others0, cpu_by_process(), server.process.pid, wall)
        cell.server_cpu = (cpu_seconds(server.process.pid) - cpu0) / wall
        used = cores_between(ticks0, ticks1)
        cell.machine_busy, cell.interrupts, cell.steal = used.busy, used.interrupts, used.steal
    except RuntimeError as exc:
        cell.error = str(exc)
    return cell


def _prepare(
    server: _Server, model: ModelVersion, payloads: dict[str, Payload], expected: int
) -> None:
    """Wait until ready; check one answer per body (raises when one is wrong)."""
    server.process.wait_ready(timeout=300)
    url = f"{server.process.base_url}/v2/models/{model.name}/infer"
    for body in server.bodies:
        for _ in range(3):
            answer = check_answer(
                url, payloads[body], model.output_name, expected, headers=server.headers
            )
        if answer.error is not None:
            raise RuntimeError(f"{server.process.name}-{body}: {answer.error}")


def _passes(
    servers: list[_Server],
    model: ModelVersion,
    payloads: dict[str, Payload],
    files: dict[str, Path],
    args: argparse.Namespace,
    wrk: str,
) -> list[list[Cell]]:
    """Every pass: each concurrency, each server and body once.

    Pass n starts n places further along the order of servers and bodies, so that
    over as many passes as there are cells per concurrency each cell holds each place
    in a pass once: the place moves the figures (two runs of 2026-12-04, four c=64
    cells a pass, five passes each: the first and last cells beat the middle two by
    4-13% of req/s, whichever server came first).
    """
    passes = []
    for n in range(args.passes):
        cells = []
        order = [(server, body) for server in servers for body in server.bodies]
        order = order[n % len(order) :] + order[: n % len(order)]
        for conc in args.concurrency:
            for server, body in order:
                background = wait_quiet(args.wait_quiet, OTHER_CPU_MAX)
                label = f"{server.process.name}-{body}"
                print(
                    f".. pass {n + 1}/{args.passes} {label} c={conc} "
                    f"(other processes before: {background:.2f} cores)",
                    flush=True,
                )
                url = f"{server.process.base_url}/v2/models/{model.name}/infer"
                cell = _measure(server, url, payloads[body], files[body], conc, args, wrk)
                cells.append(cell)
        passes.append(cells)
    return passes


@contextmanager
def _running(servers: list[_Server]) -> Iterator[None]:
    try:
        for server in servers:
            server.process.start()
        yield
    finally:
        for server in servers:
            server.process.stop(timeout=60)


# -- figures --------------------------------------------------------------------------


def _by(cells: list[Cell]) -> dict[tuple[str, int], Cell]:
    return {(c.label, c.concurrency): c for c in cells if c.result is not None}


def _ratios(cells: list[Cell], prefix: str = "fermion") -> dict[str, float]:
    """This pass's ratios, keyed as in ``TARGETS`` (``prefix``: fermion or base)."""
    by = _by(cells)
    out: dict[str, float] = {}
    for (label, conc), cell in by.items():
        r = cell.result
        assert r is not None
        if not label.startswith(f"{prefix}-"):
            continue
        key = "fermion" + label.removeprefix(prefix)
        p50 = r.latency_us["p50"]
        out[f"{key}:{conc}:p99/p50"] = r.latency_us["p99"] / p50
        out[f"{key}:{conc}:max/p50"] = r.latency_us["max"] / p50
        out[f"{key}:{conc}:p50"] = p50 / 1000
        bare = by.get(("bare-json", conc))
        if bare is not None and bare.result is not None:
            out[f"{key}:{conc}:rps/bare"] = r.rps / bare.result.rps
        if label == f"{prefix}-binary":
            json_cell = by.get((f"{prefix}-json", conc))
            if json_cell is not None and json_cell.result is not None:
                out[f"{key}:{conc}:rps/json"] = r.rps / json_cell.result.rps
        if label == f"{prefix}-ray-json":
            local = by.get((f"{prefix}-json", conc))
            if local is not None and local.result is not None:
                out[f"{key}:{conc}:rps/local"] = r.rps / local.result.rps
                out[f"{key}:{conc}:p99/local"] = (
                    r.latency_us["p99"] / local.result.latency_us["p99"]
                )
    return out


def _median_ratios(passes: list[list[Cell]], prefix: str) -> dict[str, float]:
    per_pass = [_ratios(cells, prefix) for cells in passes]
    keys = sorted({k for p in per_pass for k in p})
    return {k: statistics.median([p[k] for p in per_pass if k in p]) for k in keys}


def _against_base(passes: list[list[Cell]]) -> list[str]:
    """Per body and concurrency: fermion's req/s over base's in each pass (their median
    and range), and each side's median server CPU per request."""
    rows: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for cells in passes:
        by = _by(cells)
        for (label, conc), cell in by.items():
            if not label.startswith("fermion-"):
                continue
            other = by.get(("base" + label.removeprefix("fermion"), conc))
            if other is None or cell.result is None or other.result is None:
                continue
            mine, theirs = cell.result.rps, other.result.rps
            rows.setdefault((label.removeprefix("fermion-"), conc), []).append(
                (mine / theirs, cell.server_cpu / mine * 1e6, other.server_cpu / theirs * 1e6)
            )
    head = f"{'cell':<12} {'c':>3} {'req/s ratio':>11} {'range':>11} {'CPU us/req':>15}"
    lines = [head, "-" * len(head)]
    for (body, conc), got in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ratios = [g[0] for g in got]
        cpu = [statistics.median(g[i] for g in got) for i in (1, 2)]
        lines.append(
            f"{body:<12} {conc:>3} {statistics.median(ratios):>10.2f}x "
            f"{min(ratios):>5.2f}-{max(ratios):<5.2f} {cpu[0]:>7.0f} / {cpu[1]:<6.0f}"
        )
    lines.append("req/s ratio: fermion / base within a pass; CPU: the server's, fermion / base")
    return lines


def _ray_only(ratios: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in ratios.items() if k.startswith("fermion-ray-")}


def _table(passes: list[list[Cell]]) -> list[str]:
    """Medians over the passes, per server, body and concurrency, with the load."""
    groups: dict[tuple[str, int], list[Cell]] = {}
    for cells in passes:
        for c in cells:
            groups.setdefault((c.label, c.concurrency), []).append(c)
    head = (
        f"{'cell':<20} {'c':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'p99/p50':>7} {'max/p50':>7} {'srv CPU':>7} {'other':>6} {'steal':>6} {'retx':>5}"
    )
    lines = [head, "-" * len(head)]
    for (label, conc), cells in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ok = [c for c in cells if c.result is not None and not any(c.result.errors.values())]
        if not ok:
            lines.append(f"{label:<20} {conc:>3}  no valid pass: {cells[0].error}")
            continue

        def med(get: Callable[[Cell], float], cells: list[Cell] = ok) -> float:
            return statistics.median(get(c) for c in cells)

        rps = med(lambda c: c.result.rps if c.result else 0.0)
        p50 = med(lambda c: c.result.ms("p50") if c.result else 0.0)
        p99 = med(lambda c: c.result.ms("p99") if c.result else 0.0)
        mx = med(lambda c: c.result.ms("max") if c.result else 0.0)
        lines.append(
            f"{label:<20} {conc:>3} {rps:>8.0f} {p50:>8.2f} {p99:>8.2f} {mx:>8.1f} "
            f"{p99 / p50:>6.2f}x {mx / p50:>6.2f}x {med(lambda c: c.server_cpu):>6.0%} "
            f"{max(c.other_cpu for c in ok):>5.0%} {max(c.steal for c in ok):>5.0%} "
            f"{sum(c.tcp_retransmits for c in ok):>5}"
        )
    lines.append(
        "medians over passes; other, steal: the most any pass saw (cores, other processes "
        "and the hypervisor); retx: TCP retransmits, all passes"
    )
    return lines


def _note_lateness(lateness: Lateness, passes: list[list[Cell]]) -> None:
    """Give each measured cell the sleeper's lateness during its run."""
    for cells in passes:
        for cell in cells:
            seen = lateness.window(cell.started, cell.ended) if cell.ended else None
            if seen is not None:
                cell.host_late_p99_ms, cell.host_late_wakeups = seen


def _lateness_lines(passes: list[list[Cell]]) -> list[str]:
    """Each cell's p99 beside how often a sleeping process woke over 1 ms late meanwhile,
    and their rank correlation per concurrency: how much of the cells' spread the
    machine's slow windows account for."""
    lines = ["host lateness (a 1 ms sleeper beside the run):"]
    by_conc: dict[int, list[tuple[float, float]]] = {}
    for n, cells in enumerate(passes, 1):
        for c in cells:
            if c.result is None or c.host_late_wakeups is None or c.host_late_p99_ms is None:
                continue
            rate = c.host_late_wakeups / max(c.ended - c.started, 1e-9)
            ratio = c.result.latency_us["p99"] / c.result.latency_us["p50"]
            by_conc.setdefault(c.concurrency, []).append((ratio, rate))
            lines.append(
                f"  pass {n} {c.label:<16} c={c.concurrency:<3} p99/p50 {ratio:5.2f}x   "
                f"sleeper p99 {c.host_late_p99_ms:5.2f} ms late, {rate:5.1f}/s over 1 ms"
            )
    for conc, pairs in sorted(by_conc.items()):
        ratios, rates = (_average_ranks([pair[i] for pair in pairs]) for i in (0, 1))
        if len(pairs) >= 4 and ratios.std() > 0 and rates.std() > 0:
            rho = float(np.corrcoef(ratios, rates)[0, 1])
            lines.append(
                f"  c={conc}: rank correlation of p99/p50 with late wake-ups {rho:+.2f} "
                f"over {len(pairs)} cells"
            )
    return lines


def _average_ranks(values: list[float]) -> np.ndarray:
    """Ranks from 0, tied values sharing their mean rank (as Spearman's rho takes them)."""
    array = np.asarray(values, dtype=np.float64)
    ranks = np.empty(len(array))
    ranks[np.argsort(array, kind="stable")] = np.arange(len(array))
    _, tie = np.unique(array, return_inverse=True)
    return (np.bincount(tie, weights=ranks) / np.bincount(tie))[tie]


def _checks(ratios: dict[str, float]) -> list[dict[str, Any]]:
    checks = []
    for name, key, bound, kind in TARGETS:
        value = ratios.get(key)
        if value is None:
            status = "N/A"
        elif kind == "max":
            status = "PASS" if value <= bound else "MISS"
        else:
            status = "PASS" if value >= bound else "MISS"
        unit = " ms" if key.endswith(":p50") else "x"
        checks.append(
            {
                "name": f"{name} {'<=' if kind == 'max' else '>='} {bound:g}{unit}",
                "key": key,
                "measured": value,
                "status": status,
            }
        )
    return checks


def _format_checks(checks: list[dict[str, Any]], base: dict[str, float] | None) -> list[str]:
    lines = []
    for c in checks:
        value = c["measured"]
        unit = " ms" if c["key"].endswith(":p50") else "x"
        shown = "-" if value is None else f"{value:.2f}{unit}"
        before = ""
        if base is not None and c["key"] in base:
            before = f"   (base {base[c['key']]:.2f}{unit})"
        lines.append(f"{c['status']:<4}  {c['name']:<36} {shown:>9}{before}")
    return lines


# -- run ------------------------------------------------------------------------------


def _sample(model: ModelVersion) -> tuple[np.ndarray[Any, Any], int]:
    """One sample and the class every server must answer (ONNX Runtime's own)."""
    import onnxruntime as ort

    samples, _ = load_samples(model)
    session = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
    predicted = np.asarray(session.run(None, {model.input_name: samples[:1]})[0])
    return samples[:1], int(predicted.argmax())


def _probe_cells(
    args: argparse.Namespace,
    clis: list[tuple[str, str]],
    configs: dict[str, tuple[str, dict[str, str]]],
    model: ModelVersion,
    payloads: dict[str, Payload],
    files: dict[str, Path],
    work: Path,
    wrk: str,
) -> list[str]:
    """One probed JSON cell per Fermion; the records and plot go to ``args.probe``."""
    args.probe.mkdir(parents=True, exist_ok=True)
    records = []
    lines = []
    for name, cli in clis:
        out = args.probe / f"{name}.json"
        config, headers = configs[name]
        process = _fermion(f"{name}-probed", cli, args, config, work, _probe_wrapper(cli, out))
        server = _Server(process, ["json"], headers)
        with _running([server]):
            _prepare(server, model, payloads, _sample(model)[1])
            wait_quiet(args.wait_quiet, OTHER_CPU_MAX)
            url = f"{process.base_url}/v2/models/{model.name}/infer"
            conc = args.probe_concurrency
            cell = _measure(server, url, payloads["json"], files["json"], conc, args, wrk)
        if cell.result is not None:
            r = cell.result
            lines.append(
                f"{name} probed c={conc} json: {r.rps:.0f} req/s, p50 {r.ms('p50'):.2f} ms, "
                f"p99 {r.ms('p99'):.2f} ms, max {r.ms('max'):.1f} ms (wrk)"
            )
        record = json.loads(out.read_text())
        records.append((name, record))
        lines += summarize(name, record).lines()
    render_svg(records, args.probe / "timeline.svg")
    lines.append(f"wrote {args.probe / 'timeline.svg'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the passes, print the medians and the targets; with --check, 1 on a miss."""
    args = _parse_args(argv)
    if args.probe is not None:  # checked before the passes, not after them
        for cli in filter(None, (args.fermion, args.base)):
            if not Path(cli).with_name("python").exists():
                sys.exit(f"--probe runs the gateway on the Python beside {cli}: none there")
    wrk = find_wrk()
    model = find_model_version(args.store, args.model)
    versions = sorted(int(p.name) for p in (args.store / args.model).iterdir() if p.name.isdigit())
    sample, expected = _sample(model)
    payloads = {
        "json": json_payload(model.input_name, sample),
        "binary": binary_payload(model.input_name, model.output_name, sample),
    }
    note = _features_note(args.features, versions, args.sample_ratio)
    if args.inline_max_ms:
        note += f"; local.inline_max_ms {args.inline_max_ms:g} (opt-in)"
    if args.export_process and "tracing" in args.features:
        note += "; tracing.export_process (this checkout's servers)"
    print(
        f"model {model.name} v{model.version}; {args.passes} passes of {args.duration} s "
        f"cells, wrk -t1, concurrency {args.concurrency}\nfermion: {note}",
        flush=True,
    )
    base_note = None
    if args.base and args.base_features != args.features:
        base_note = _features_note(args.base_features, versions, args.sample_ratio)
        print(f"base: {base_note}", flush=True)
    clis = [("fermion", args.fermion)] + ([("base", args.base)] if args.base else [])
    report: list[str] = []
    record: dict[str, Any] = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            k: ",".join(sorted(v)) if isinstance(v, frozenset) else str(v)
            for k, v in vars(args).items()
        },
        "features": note,
        "base_features": base_note,
        "cores": os.cpu_count(),
    }
    with (
        tempfile.TemporaryDirectory(prefix="fermion-tail-") as tmp,
        span_sink() as traces,
        ExitStack() as sleeper,
    ):
        work = Path(tmp)
        if args.host_lateness:
            sleeper.enter_context(host_lateness(work / "lateness.bin"))
        files = {k: work / f"body.{k}" for k in payloads}
        for kind, path in files.items():
            path.write_bytes(payloads[kind].body)
        configs = _configs(args, clis, model.name, versions, "local", work, traces)
        servers = [] if args.no_bare else [_Server(_bare(args, work), ["json"])]
        for name, cli in clis:
            process = _fermion(name, cli, args, configs[name][0], work, [])
            servers.append(_Server(process, ["json", "binary"], configs[name][1]))
        ray_passes: list[list[Cell]] = []
        with _running(servers):
            for server in servers:
                _prepare(server, model, payloads, expected)
            passes = _passes(servers, model, payloads, files, args, wrk)
            if args.ray:
                ray_configs = _configs(args, clis, model.name, versions, "ray", work, traces)
                pairs = [s for s in servers if s.process.name in dict(clis)]
                rays = [
                    _Server(
                        _fermion(f"{name}-ray", cli, args, ray_configs[name][0], work, []),
                        ["json"],
                        ray_configs[name][1],
                    )
                    for name, cli in clis
                ]
                with _running(rays):
                    for server in rays:
                        _prepare(server, model, payloads, expected)
                    # Each ray cell beside a local JSON cell of the same pass.
                    local_json = [_Server(s.process, ["json"], s.headers) for s in pairs]
                    ray_passes = _passes([*local_json, *rays], model, payloads, files, args, wrk)
        sleeper.close()
        if args.host_lateness:
            _note_lateness(Lateness.read(work / "lateness.bin"), [*passes, *ray_passes])
        if args.probe is not None:
            report += _probe_cells(args, clis, configs, model, payloads, files, work, wrk)
        record["span_exports_received"] = SpanSink.received
    mine = _median_ratios(passes, "fermion") | _ray_only(_median_ratios(ray_passes, "fermion"))
    base = None
    if args.base:
        base = _median_ratios(passes, "base") | _ray_only(_median_ratios(ray_passes, "base"))
    checks = _checks(mine)
    print()
    print("\n".join(_table(passes)))
    if ray_passes:
        print("\nray phase (Fermion local beside Fermion on backend ray):")
        print("\n".join(_table(ray_passes)))
    if args.base:
        print("\nfermion against base, pass by pass:")
        print("\n".join(_against_base([*passes, *ray_passes])))
    if args.host_lateness:
        print()
        print("\n".join(_lateness_lines(passes)))
        if ray_passes:
            print("ray phase:")
            print("\n".join(_lateness_lines(ray_passes)[1:]))
    if report:
        print()
        print("\n".join(report))
    print("\ntargets (medians of per-pass ratios):")
    print("\n".join(_format_checks(checks, base)))
    record |= {
        "passes": [[c.record(None) for c in cells] for cells in passes],
        "ray_passes": [[c.record(None) for c in cells] for cells in ray_passes],
        "ratios": mine,
        "base_ratios": base,
        "checks": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    invalid = [
        c
        for cells in passes + ray_passes
        for c in cells
        if c.result is None or any(c.result.errors.values())
    ]
    if invalid:
        print(f"!! {len(invalid)} cell(s) did not run cleanly", file=sys.stderr)
        return 1
    missed = [c for c in checks if c["status"] == "MISS"]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
