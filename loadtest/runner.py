"""Run a load test, then write the report folder and the SLO verdict.

Three modes: ``--rate`` runs the open-loop engine (in this process or N worker
processes); a capture file replays recorded traffic through the same engine; otherwise
locust's closed-loop users run headless in subprocesses (one, or a master and N workers;
locust monkey-patches the process it runs in, so never this one). Either way one request
is sent first (a request the model refuses ends the test at once), and every gateway's
``/metrics`` is scraped before and after for the server's side of the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Final

from loadtest.open_runner import EngineJob, JobResult, run_jobs
from loadtest.options import EXIT_SLO_MISSED, LoadTestError, LoadTestOptions, LoadTestResult
from loadtest.preflight import RAW_FILE, prepare, settings_line
from loadtest.progress import PROGRESS_PREFIX, Progress, ProgressLine
from loadtest.report_html import render_html
from loadtest.server_metrics import breakdown, scrape_all
from loadtest.slo import Slo, SloResult, evaluate
from loadtest.summary import summarize, write_history

__all__ = [
    "EXIT_SLO_MISSED",
    "LoadTestError",
    "LoadTestOptions",
    "LoadTestResult",
    "locust_command",
    "run_loadtest",
    "worker_command",
    "write_report",
]


_HERE = Path(__file__).resolve().parent
_LOCUSTFILES: Final = f"{_HERE / 'locustfile.py'},{_HERE / 'shapefile.py'}"
_STOP_TIMEOUT_S: Final = 10


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("", "*") else "0.0.0.0", 0))
        port: int = s.getsockname()[1]
        return port


def worker_command(master_host: str, master_port: int) -> list[str]:
    """The command line of a locust worker for a master at ``master_host:master_port``."""
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        _LOCUSTFILES,
        "--worker",
        "--master-host",
        master_host,
        "--master-port",
        str(master_port),
    ]


def locust_command(opts: LoadTestOptions, samples: Path | None, master: bool) -> list[str]:
    """The command line of the locust process that runs the test (``master`` when distributed)."""
    out = opts.out.resolve()
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        _LOCUSTFILES,
        "--headless",
        "--only-summary",
        "-H",
        opts.url.rstrip("/"),
        "-u",
        str(opts.users),
        "-r",
        str(opts.spawn_rate),
        "--shape",
        opts.shape,
        "--steps",
        str(opts.steps),
        "--duration",
        f"{opts.duration_s}s",
        "--stop-timeout",
        str(_STOP_TIMEOUT_S),
        "--exit-code-on-error",
        "0",
        "--csv",
        str(out / "locust"),
        "--csv-full-history",
        "--model",
        opts.model,
        "--batch-size",
        str(opts.batch_size),
        "--user-rps",
        str(opts.user_rps),
        "--api-key-env",
        opts.api_key_env,
        "--protocol",
        opts.protocol,
        "--record",
        str(out / RAW_FILE),
    ]
    if opts.model_version:
        cmd += ["--model-version", opts.model_version]
    if opts.binary:
        cmd.append("--binary")
    if samples is not None:
        cmd += ["--samples", str(samples.resolve())]
    if master:
        assert opts.master_port is not None
        expected = opts.workers + opts.remote_workers
        cmd += [
            "--master",
            "--master-bind-host",
            opts.master_bind,
            "--master-bind-port",
            str(opts.master_port),
            "--expect-workers",
            str(expected),
            "--expect-workers-max-wait",
            "600" if opts.remote_workers else "60",
        ]
    return cmd


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(_HERE.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _pump_locust(stream: IO[bytes], log: IO[bytes], progress: ProgressLine | None) -> None:
    """Copy locust's output to its log; show its progress lines instead of logging them."""
    for line in stream:
        if line.startswith(PROGRESS_PREFIX):
            if progress is not None:
                with contextlib.suppress(ValueError, TypeError):
                    progress.show(Progress(**json.loads(line[len(PROGRESS_PREFIX) :])))
            continue
        log.write(line)
        log.flush()


def _run_processes(
    opts: LoadTestOptions,
    samples: Path | None,
    echo: Callable[[str], None],
    progress: ProgressLine | None = None,
) -> None:
    distributed = opts.workers > 1 or opts.remote_workers > 0
    if distributed and opts.master_port is None:
        opts.master_port = _free_port(opts.master_bind)
    log = opts.out / "locust.log"
    logs: list[IO[bytes]] = []
    procs: list[subprocess.Popen[bytes]] = []
    env = _env()
    pump: threading.Thread | None = None
    try:
        logs.append(log.open("wb"))
        main = subprocess.Popen(
            locust_command(opts, samples, distributed),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        procs.append(main)
        assert main.stdout is not None
        pump = threading.Thread(
            target=_pump_locust, args=(main.stdout, logs[0], progress), daemon=True
        )
        pump.start()
        if distributed:
            assert opts.master_port is not None
            host = opts.master_bind
            if host in ("0.0.0.0", "", "*"):
                host = socket.gethostname()
            if opts.remote_workers:
                remote = " ".join(["fermion loadtest worker", "--master-host", host])
                echo(f"workers on other hosts: {remote} --master-port {opts.master_port}")
            local_host = "127.0.0.1" if opts.master_bind in ("0.0.0.0", "", "*") else host
            for i in range(opts.workers if opts.workers > 1 else 0):
                logs.append((opts.out / f"worker-{i + 1}.log").open("wb"))
                procs.append(
                    subprocess.Popen(
                        worker_command(local_host, opts.master_port),
                        stdout=logs[-1],
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
        limit = opts.duration_s + 120 + (600 if opts.remote_workers else 60)
        try:
            code = main.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            raise LoadTestError(f"locust did not finish in {limit:.0f}s; see {log}") from None
        pump.join(timeout=10)
        for p in procs[1:]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if code != 0:
            raise LoadTestError(f"locust exited with {code}; see {log}:\n{_tail(log)}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        if pump is not None:
            pump.join(timeout=10)
        for f in logs:
            f.close()


def _open_loop(opts: LoadTestOptions, job: EngineJob, progress: ProgressLine | None) -> JobResult:
    try:
        result = run_jobs(job, opts.workers, opts.out, progress.tick if progress else None)
    except (RuntimeError, OSError, ValueError) as e:
        raise LoadTestError(str(e)) from None
    finally:
        if progress is not None:
            progress.close()
    if result.stats.aborted:
        stats = result.stats
        raise LoadTestError(f"stopped after {stats.completed} answers: {stats.aborted}")
    return result


def write_report(out: Path, summary: dict[str, Any], slos: list[Slo]) -> list[SloResult]:
    """Check ``slos`` and write the report folder (summary.json, history.csv, report.html)."""
    results = evaluate(slos, summary)
    summary["slo"] = [r.to_dict() for r in results]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_history(summary, out / "history.csv")
    (out / "report.html").write_text(render_html(summary))
    return results


def run_loadtest(
    opts: LoadTestOptions,
    echo: Callable[[str], None] = print,
    progress: ProgressLine | None = None,
) -> LoadTestResult:
    """Run the test ``opts`` describe and write its report folder (``opts.out``)."""
    ready = prepare(opts)
    echo(f"load test: {settings_line(ready.config)}")
    before = scrape_all(ready.scrape, ready.headers)
    generator = None
    if opts.mode == "closed":
        _run_processes(opts, ready.samples, echo, progress)
        if progress is not None:
            progress.close()
        raw_path = opts.out / RAW_FILE
        if not raw_path.is_file():
            raise LoadTestError(f"locust wrote no measurements; see {opts.out / 'locust.log'}")
        raw = json.loads(raw_path.read_text())
    else:
        result = _open_loop(opts, ready.job, progress)
        raw = result.measured.to_dict()
        raw["workers"] = opts.workers if opts.workers > 1 else 0
        generator = result.stats.to_dict()
        (opts.out / RAW_FILE).write_text(json.dumps(raw))
    after = scrape_all(ready.scrape, ready.headers)
    summary = summarize(raw, ready.config)
    summary["generator"] = generator
    if ready.check is not None:  # sent before the load to the first gateway: not measured
        summary["check"] = {"status": ready.check.status, "version": ready.check.version}
    summary["server"] = breakdown(before, after) if ready.scrape else None
    results = write_report(opts.out, summary, opts.slos)
    return LoadTestResult(summary, results, opts.out)
