"""Fermion (JSON, binary) vs a bare endpoint, KServe and BentoML, side by side.

One run starts every server on free loopback ports (KServe's Python model server and
a BentoML service each in a virtual environment of its own, see
``bench/competitors.py``), checks one answer from each,
drives every cell with wrk (one load generator, fixed bodies), then measures raw
in-process ONNX Runtime throughput, prints the table with the targets, and writes
``bench/results/latest.json``.

    bash bench/run.sh [--quick] [--only SERVER] [--competitors bare,kserve,bentoml] ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench._payloads import (
    Payload,
    bentoml_payload,
    binary_payload,
    check_answer,
    json_payload,
)
from bench._procs import (
    ServerProcess,
    busiest_others,
    cores_between,
    cpu_by_process,
    cpu_seconds,
    free_port,
    loaded,
    machine_ticks,
    rss_bytes,
    tcp_retransmits,
    wait_quiet,
)
from bench._report import (
    MIB,
    OTHER_CPU_MAX,
    Cell,
    Check,
    compare,
    evaluate,
    format_cells,
    format_checks,
    format_comparison,
)
from bench._store import ModelVersion, find_model_version, load_samples
from bench._wrk import find_wrk, run_wrk

__all__ = ["main"]

_ROOT = Path(__file__).resolve().parent.parent
_HOST = "127.0.0.1"
#: Servers that can run beside Fermion.
_COMPETITORS = ("bare", "kserve", "bentoml")
#: Cells of the competitors Fermion's ratios are printed against.
_VERSUS = {"kserve": "kserve-json", "bentoml": "bentoml-json"}


def _seconds(text: str) -> int:
    value = int(float(text.strip().removesuffix("s")))
    if value < 1:
        raise argparse.ArgumentTypeError("a duration is at least 1 second")
    return value


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.sh", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument(
        "--store",
        type=Path,
        default=Path(os.environ.get("STORE", "model_store")),
        help="model store root (default model_store, env STORE)",
    )
    parser.add_argument("--model", default="digits", help="model name (default digits)")
    parser.add_argument(
        "--duration",
        type=_seconds,
        default=_seconds(os.environ.get("DURATION", "10")),
        help="seconds per measured cell (default 10, env DURATION)",
    )
    parser.add_argument("--warmup", type=_seconds, default=None, help="seconds before each cell")
    parser.add_argument("--quick", action="store_true", help="3 s cells, 1 s warm-ups")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each cell, wait up to this many seconds for other processes to go "
        "idle (default 60; 0: do not wait)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a cell again, up to this many times, when other processes were busy "
        "during it (default 2)",
    )
    parser.add_argument("--concurrency", default="1,64", help="comma-separated, default 1,64")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--only", choices=("fermion", *_COMPETITORS), help="run one server only")
    parser.add_argument(
        "--competitors",
        default=",".join(_COMPETITORS),
        help=f"servers run beside Fermion, comma-separated (default {','.join(_COMPETITORS)})",
    )
    parser.add_argument(
        "--fermion",
        default=str(Path(sys.executable).with_name("fermion")),
        help="the fermion CLI (default: the one beside this Python)",
    )
    parser.add_argument("--config", type=Path, help="passed to `fermion serve --config`")
    parser.add_argument(
        "--ready-timeout", type=float, default=180.0, help="seconds to wait for a server"
    )
    parser.add_argument("--no-ort", action="store_true", help="skip raw ONNX Runtime throughput")
    parser.add_argument(
        "--out",
        type=Path,
        default=_ROOT / "bench" / "results" / "latest.json",
        help="results JSON (default bench/results/latest.json)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 3
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    competitors = {c.strip() for c in args.competitors.split(",") if c.strip()}
    unknown = sorted(competitors - set(_COMPETITORS))
    if unknown:
        parser.error(f"unknown competitors {unknown}: use {', '.join(_COMPETITORS)}")
    args.servers = {args.only} if args.only else {"fermion", *competitors}
    return args


def _pick_sample(model: ModelVersion) -> tuple[np.ndarray[Any, Any], int, str]:
    """One sample input, the class it should get, and where that expectation comes from."""
    import onnxruntime as ort

    samples, labels = load_samples(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(model.onnx_path), options, providers=["CPUExecutionProvider"]
    )
    predicted = np.asarray(session.run(None, {model.input_name: samples})[0]).argmax(axis=1)
    if labels is not None:
        hits = np.flatnonzero(predicted == labels[: len(predicted)])
        if len(hits):
            i = int(hits[0])
            return samples[i : i + 1], int(labels[i]), f"label of sample {i}"
    return samples[:1], int(predicted[0]), "in-process ONNX Runtime argmax of sample 0"


def _competitor_python(name: str) -> Path | None:
    """The Python of a competitor's environment, or None (said why) when pip cannot make it."""
    from bench.competitors import competitor_python

    try:
        return competitor_python(name)
    except (subprocess.CalledProcessError, OSError) as exc:
        print(
            f"!! cannot install {name} ({exc}); skipping it (--competitors leaves it out)",
            file=sys.stderr,
            flush=True,
        )
        return None


def _servers(args: argparse.Namespace, model: ModelVersion, logs: Path) -> list[ServerProcess]:
    servers = []
    if "bare" in args.servers:
        port = free_port()
        argv = [sys.executable, "-m", "bench.bare_endpoint", "--store", str(args.store)]
        argv += ["--model", args.model, "--host", _HOST, "--port", str(port)]
        servers.append(ServerProcess("bare", argv, f"http://{_HOST}:{port}", logs / "bare.log"))
    kserve = _competitor_python("kserve") if "kserve" in args.servers else None
    if kserve is not None:
        port = free_port()
        argv = [str(kserve), str(_ROOT / "bench" / "kserve_endpoint.py")]
        argv += ["--onnx", str(model.onnx_path), "--model", args.model, "--port", str(port)]
        servers.append(ServerProcess("kserve", argv, f"http://{_HOST}:{port}", logs / "kserve.log"))
    bentoml = _competitor_python("bentoml") if "bentoml" in args.servers else None
    if bentoml is not None:
        port = free_port()
        argv = [str(bentoml.with_name("bentoml")), "serve"]
        argv += ["bentoml_service:OnnxClassifier", "--working-dir", str(_ROOT / "bench")]
        argv += ["--host", _HOST, "--port", str(port)]
        servers.append(
            ServerProcess(
                "bentoml",
                argv,
                f"http://{_HOST}:{port}",
                logs / "bentoml.log",
                ready_path="/readyz",
                infer_path="/predict",
                env={"FERMION_BENCH_ONNX": str(model.onnx_path.resolve())},
            )
        )
    if "fermion" in args.servers:
        port = free_port()
        argv = [args.fermion, "serve", "--store", str(args.store), "--host", _HOST]
        argv += ["--port", str(port), "--grpc-port", "off"]
        if args.config is not None:
            argv += ["--config", str(args.config)]
        servers.append(
            ServerProcess("fermion", argv, f"http://{_HOST}:{port}", logs / "fermion.log")
        )
    return servers


def _measure_cell(
    cell: Cell,
    server: ServerProcess,
    url: str,
    payload: Payload,
    body_file: Path,
    args: argparse.Namespace,
    wrk: str,
) -> None:
    common = {"connections": cell.concurrency, "threads": args.threads}
    try:
        run_wrk(wrk, url, payload, body_file, duration_s=args.warmup, **common)
        cpu0, ticks0 = cpu_seconds(server.pid), machine_ticks()
        retx0, others0 = tcp_retransmits(), cpu_by_process()
        t0 = time.monotonic()
        cell.result = run_wrk(wrk, url, payload, body_file, duration_s=args.duration, **common)
        wall = time.monotonic() - t0
        ticks1 = machine_ticks()
        cell.tcp_retransmits = tcp_retransmits() - retx0
        cell.other_top = busiest_others(others0, cpu_by_process(), server.pid, wall)
        cell.server_cpu = (cpu_seconds(server.pid) - cpu0) / wall
        used = cores_between(ticks0, ticks1)
        cell.machine_busy, cell.interrupts, cell.steal = used.busy, used.interrupts, used.steal
    except RuntimeError as exc:
        cell.error = str(exc)


def _machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "wrk": (wrk_version.stdout or wrk_version.stderr).splitlines()[0],
    }


@dataclass
class _Session:
    """What one run gathers, step by step."""

    args: argparse.Namespace
    model: ModelVersion
    expected: int
    payloads: dict[str, Payload]
    body_files: dict[str, Path] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    idle_rss: int | None = None
    torch_files: list[str] | None = None

    def url(self, server: ServerProcess) -> str:
        path = server.infer_path or f"/v2/models/{self.model.name}/infer"
        return server.base_url + path

    def kind(self, server: ServerProcess, body: str) -> str:
        """The payload a server gets for ``body``: BentoML takes its own JSON."""
        return "bentoml" if server.name == "bentoml" else body

    def skip(self, server: str, bodies: list[str], why: str) -> None:
        for conc in self.args.concurrency:
            self.cells += [Cell(server, body, conc, error=why) for body in bodies]


def _prepare(session: _Session, server: ServerProcess) -> list[str]:
    """Wait for ``server``, check one answer per body, read its idle RSS: the bodies to run."""
    bodies = ["json", "binary"] if server.name == "fermion" else ["json"]
    try:
        server.wait_ready(timeout=session.args.ready_timeout)
    except RuntimeError as exc:
        session.notes[f"{server.name}_error"] = str(exc)
        print(f"!! {exc}", file=sys.stderr, flush=True)
        session.skip(server.name, bodies, "server not ready")
        return []
    ok = []
    for body in bodies:
        for _ in range(3):  # warm-up requests; the last answer is the one checked
            answer = check_answer(
                session.url(server),
                session.payloads[session.kind(server, body)],
                session.model.output_name,
                session.expected,
            )
        label = f"{server.name}-{body}"
        session.answers[label] = answer.error or ""
        session.notes.setdefault("served_version", {})[label] = answer.model_version
        if answer.model_version not in (None, str(session.model.version)):
            print(
                f"!! {label} answered from version {answer.model_version}; the bare endpoint "
                f"runs version {session.model.version}'s artifact",
                file=sys.stderr,
                flush=True,
            )
        if answer.error is None:
            ok.append(body)
        else:
            print(f"!! {label}: {answer.error}", file=sys.stderr, flush=True)
            session.skip(server.name, [body], f"bad answer: {answer.error}")
    time.sleep(1.0)
    rss = rss_bytes(server.pid)
    session.notes[f"{server.name}_idle_rss_mib"] = round(rss / MIB, 1)
    if server.name == "fermion":
        session.idle_rss = rss
        session.torch_files = sorted(
            set(loaded(server.pid, "libtorch") + loaded(server.pid, "/torch/"))
        )
    return ok


def _run_cell(session: _Session, server: ServerProcess, body: str, conc: int, wrk: str) -> Cell:
    """Measure one cell; measure it again (up to ``--retries``) while other processes
    were busy during it, and keep the attempt they disturbed least."""
    best: Cell | None = None
    for attempt in range(1 + session.args.retries):
        cell = Cell(server.name, body, conc, attempts=attempt + 1)
        background = wait_quiet(session.args.wait_quiet, OTHER_CPU_MAX)
        print(
            f".. {cell.label} c={conc} (other processes before: {background:.2f} cores)",
            flush=True,
        )
        _measure_cell(
            cell,
            server,
            session.url(server),
            session.payloads[session.kind(server, body)],
            session.body_files[session.kind(server, body)],
            session.args,
            wrk,
        )
        if best is None or best.result is None or cell.noise < best.noise:
            best = cell
        if cell.result is None or not cell.noisy:
            break
        print(
            f"   other processes used {cell.other_cpu:.0%} of a core, the hypervisor took "
            f"{cell.steal:.0%}: noisy",
            flush=True,
        )
    assert best is not None
    best.attempts = cell.attempts
    return best


def _run_cells(session: _Session, live: list[tuple[ServerProcess, list[str]]], wrk: str) -> None:
    for conc in session.args.concurrency:
        for server, bodies in live:
            for body in bodies:
                session.cells.append(_run_cell(session, server, body, conc, wrk))
    for server, _ in live:
        session.notes[f"{server.name}_rss_after_load_mib"] = round(rss_bytes(server.pid) / MIB, 1)


def _serve_and_measure(session: _Session, wrk: str) -> None:
    """Start the servers, check them, run every cell, stop them."""
    with tempfile.TemporaryDirectory(prefix="fermion-bench-") as tmp:
        work = Path(tmp)
        for kind, payload in session.payloads.items():
            session.body_files[kind] = work / f"body.{kind}"
            session.body_files[kind].write_bytes(payload.body)
        servers = _servers(session.args, session.model, work)
        try:
            for server in servers:
                server.start()
            live = [(server, _prepare(session, server)) for server in servers]
            _run_cells(session, [(s, b) for s, b in live if b], wrk)
        finally:
            for server in servers:
                server.stop()
    order = {
        "bare-json": 0,
        "kserve-json": 1,
        "bentoml-json": 2,
        "fermion-json": 3,
        "fermion-binary": 4,
    }
    session.cells.sort(key=lambda c: (c.concurrency, order.get(c.label, 3)))


def _ort_raw(session: _Session) -> list[dict[str, Any]]:
    from bench.ort_raw import measure_ort  # imports onnxruntime: only now, servers stopped

    samples, _ = load_samples(session.model)
    seconds = min(5.0, max(1.0, session.args.duration / 2))
    results = measure_ort(
        session.model.onnx_path, session.model.input_name, samples, seconds=seconds
    )
    return [asdict(r) for r in results]


def _print_report(session: _Session, checks: list[Check], ort_raw: list[dict[str, Any]]) -> None:
    print()
    print(format_cells(session.cells))
    for name, label in _VERSUS.items():
        versus = format_comparison(compare(session.cells, label))
        if versus:
            print(f"\nFermion / {name} (req/s: higher is better; p50, p99: lower is better):")
            print(versus)
    print()
    if session.idle_rss is not None:
        print(
            f"fermion serve idle RSS: {session.idle_rss / MIB:.1f} MiB; "
            f"torch loaded: {bool(session.torch_files)}"
        )
    if "bare_idle_rss_mib" in session.notes:
        print(f"bare endpoint idle RSS: {session.notes['bare_idle_rss_mib']} MiB")
    for name in _VERSUS:
        if f"{name}_idle_rss_mib" in session.notes:
            print(f"{name} idle RSS: {session.notes[f'{name}_idle_rss_mib']} MiB")
    if ort_raw:
        print("\nraw in-process ONNX Runtime (1 intra-op thread, no HTTP):")
        print(f"{'batch':>5} {'samples/s':>10} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
        for r in ort_raw:
            print(
                f"{r['batch']:>5} {r['samples_per_s']:>10.0f} {r['calls_per_s']:>9.0f} "
                f"{r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f}"
            )
    print("\ntargets:")
    print(format_checks(checks))


def _record(
    session: _Session, checks: list[Check], ort_raw: list[dict[str, Any]]
) -> dict[str, Any]:
    args, model = session.args, session.model
    bare = {c.concurrency: c for c in session.cells if c.label == "bare-json"}
    torch = session.torch_files
    return {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": _machine(),
        "model": {"name": model.name, "version": model.version, "artifact": str(model.onnx_path)},
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "wrk_threads": args.threads,
            "concurrency": args.concurrency,
            "wait_quiet_s": args.wait_quiet,
            "retries": args.retries,
        },
        "cells": [c.record(bare.get(c.concurrency)) for c in session.cells],
        **{f"vs_{name}": compare(session.cells, label) for name, label in _VERSUS.items()},
        "checks": [c.record() for c in checks],
        "idle_rss_mib": None if session.idle_rss is None else round(session.idle_rss / MIB, 1),
        "torch_loaded": None if torch is None else bool(torch),
        "torch_files": torch,
        "ort_raw": ort_raw,
        "notes": session.notes,
    }


def main(argv: list[str] | None = None) -> int:
    """Run every cell, print the report, write the JSON; non-zero if a sanity check failed."""
    args = _parse_args(argv)
    try:
        wrk = find_wrk()
    except FileNotFoundError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    try:
        model = find_model_version(args.store, args.model)
    except FileNotFoundError as exc:
        print(f"bench: {exc}; `make demo` publishes the demo model", file=sys.stderr)
        return 2
    x, expected, expected_from = _pick_sample(model)
    payloads = {
        "json": json_payload(model.input_name, x),
        "binary": binary_payload(model.input_name, model.output_name, x),
        "bentoml": bentoml_payload(x),
    }
    session = _Session(args, model, expected, payloads)
    session.notes["bodies_bytes"] = {k: len(p.body) for k, p in payloads.items()}
    print(
        f"model {model.name} v{model.version}: {model.onnx_path} "
        f"(expect class {expected}: {expected_from}); cells {args.duration}s, "
        f"warm-up {args.warmup}s, wrk -t{args.threads}, concurrency {args.concurrency}",
        flush=True,
    )
    _serve_and_measure(session, wrk)
    ort_raw = [] if args.no_ort else _ort_raw(session)
    low, high = min(args.concurrency), max(args.concurrency)
    checks = evaluate(
        session.cells, low, high, session.idle_rss, session.torch_files, session.answers
    )
    _print_report(session, checks, ort_raw)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_record(session, checks, ort_raw), indent=2) + "\n")
    print(f"\nwrote {args.out}")
    sanity = [c for c in checks if c.name.startswith(("answers", "wrk saw", "every cell"))]
    return 1 if any(c.status == "MISS" for c in sanity) else 0


if __name__ == "__main__":
    sys.exit(main())
