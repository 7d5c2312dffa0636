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
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from loadtest.gateway import GatewayError, auth_headers, fetch_metadata
from loadtest.open_runner import EngineJob, JobResult, check_request, run_jobs
from loadtest.payloads import find_samples
from loadtest.progress import PROGRESS_PREFIX, Progress, ProgressLine
from loadtest.rates import parse_rate
from loadtest.report_html import render_html
from loadtest.server_metrics import breakdown, scrape_all
from loadtest.slo import Slo, SloResult, evaluate
from loadtest.summary import summarize, write_history
from loadtest.transport import Outcome

__all__ = [
    "EXIT_SLO_MISSED",
    "LoadTestError",
    "LoadTestOptions",
    "LoadTestResult",
    "Prepared",
    "check_model_request",
    "engine_job",
    "locust_command",
    "metrics_urls",
    "prepare",
    "run_loadtest",
    "settings",
    "settings_line",
    "worker_command",
    "write_report",
]

#: The exit status of ``fermion loadtest`` when an SLO was missed.
EXIT_SLO_MISSED: Final = 1

_HERE = Path(__file__).resolve().parent
_LOCUSTFILES: Final = f"{_HERE / 'locustfile.py'},{_HERE / 'shapefile.py'}"
_STOP_TIMEOUT_S: Final = 10
_RAW: Final = "raw.json"
#: Answers that refuse the request itself (a busy server's 429/503 are results, not these).
_REFUSED: Final = frozenset({400, 401, 403, 404, 405, 411, 413, 415, 422})


class LoadTestError(RuntimeError):
    """The load test could not run (server unreachable, locust failed, nothing measured)."""


@dataclass
class LoadTestOptions:
    """Everything ``fermion loadtest`` takes."""

    url: str
    model: str
    out: Path
    users: int = 10
    spawn_rate: float = 10.0
    duration_s: float = 60.0
    shape: str = "steady"
    steps: int = 4
    binary: bool = False
    batch_size: int = 1
    model_version: str | None = None
    samples: Path | None = None
    store: Path | None = None
    user_rps: float = 0.0
    api_key_env: str = "FERMION_API_KEY"
    slos: list[Slo] = field(default_factory=list)
    workers: int = 1
    remote_workers: int = 0
    master_bind: str = "127.0.0.1"
    master_port: int | None = None
    #: Every gateway's base URL (``url`` is the first); open loop spreads requests over them.
    urls: list[str] = field(default_factory=list)
    #: Open loop: the arrival rate plan (``2000/s``, steps, ramps); None: locust users.
    rate: str | None = None
    arrival: str = "uniform"
    protocol: str = "http"
    max_connections: int = 1000
    timeout_s: float = 30.0
    #: ``/metrics`` URLs to scrape around the run (None: each gateway's; []: none).
    metrics_urls: list[str] | None = None
    #: Replay this capture (a file or a folder of them) instead of generated requests.
    replay: Path | None = None
    speed: float = 1.0

    @property
    def targets(self) -> list[str]:
        """The gateways' base URLs."""
        return [u.rstrip("/") for u in (self.urls or [self.url])]

    @property
    def mode(self) -> str:
        """``replay``, ``open`` (a rate) or ``closed`` (locust users)."""
        return "replay" if self.replay is not None else "open" if self.rate else "closed"


@dataclass
class LoadTestResult:
    """A finished load test: its summary, SLO verdicts and report folder."""

    summary: dict[str, Any]
    slo_results: list[SloResult]
    out: Path

    @property
    def slo_missed(self) -> list[SloResult]:
        """The objectives that were missed."""
        return [r for r in self.slo_results if not r.ok]


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
        "--record",
        str(out / _RAW),
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


def _require_locust() -> None:
    if importlib.util.find_spec("locust") is None:
        raise LoadTestError("locust is missing: pip install 'fermion[loadtest]'")


def _samples(opts: LoadTestOptions) -> Path | None:
    if opts.samples is not None:
        if not opts.samples.is_file():
            raise LoadTestError(f"samples file {opts.samples} not found")
        return opts.samples
    if opts.store is not None:
        version = int(opts.model_version) if opts.model_version else None
        return find_samples(opts.store, opts.model, version)
    return None


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


def engine_job(opts: LoadTestOptions, samples: Path | None) -> EngineJob:
    """The open-loop engine's job for ``opts`` (also used for the request check)."""
    return EngineJob(
        targets=opts.targets,
        model=opts.model,
        model_version=opts.model_version,
        protocol=opts.protocol,
        binary=opts.binary,
        batch_size=opts.batch_size,
        samples=str(samples.resolve()) if samples else None,
        api_key_env=opts.api_key_env,
        max_connections=opts.max_connections,
        timeout_s=opts.timeout_s,
        rate=opts.rate,
        duration_s=opts.duration_s,
        arrival=opts.arrival,
        replay=str(opts.replay.resolve()) if opts.replay else None,
        speed=opts.speed,
    )


def check_model_request(job: EngineJob) -> Outcome:
    """Send one request of the test before the load: one the model refuses (a batch over
    its maximum, a wrong input) ends the test now, with the server's message. Returns
    what came back (the report records it: the gateways counted this request too)."""
    outcome = check_request(job)
    if outcome.status == 0:
        raise LoadTestError(f"the test's first request got no answer: {outcome.error}")
    if outcome.status in _REFUSED:
        raise LoadTestError(
            f"the gateway refuses the test's requests, so every request would fail: {outcome.error}"
        )
    return outcome


def settings(opts: LoadTestOptions, samples: Path | None) -> dict[str, Any]:
    """Every setting that shapes the result, as the report's header records it."""
    mode = opts.mode
    config: dict[str, Any] = {
        "mode": {"open": "open loop", "closed": "closed loop (locust)", "replay": "replay"}[mode],
        "url": opts.url,
        "urls": opts.targets,
        "protocol": opts.protocol,
        "api_key": f"${opts.api_key_env}" if os.environ.get(opts.api_key_env) else "none",
        "workers": opts.workers + opts.remote_workers
        if opts.workers > 1 or opts.remote_workers
        else 0,
    }
    if mode == "replay":
        config.update(replay=str(opts.replay), speed=opts.speed, timeout=f"{opts.timeout_s:g}s")
        config.update(max_connections=opts.max_connections)
        return config
    config.update(
        model=opts.model,
        model_version=opts.model_version,
        route=f"version {opts.model_version}" if opts.model_version else "routed by the gateway",
        encoding="binary" if opts.binary else "json",
        binary=opts.binary,
        batch_size=opts.batch_size,
        samples=str(samples) if samples else None,
        inputs="samples" if samples else "random within the signature",
        duration=f"{opts.duration_s:g}s",
    )
    if mode == "open":
        assert opts.rate is not None
        config.update(
            rate=parse_rate(opts.rate, opts.duration_s).describe(),
            arrival=opts.arrival,
            max_connections=opts.max_connections,
            timeout=f"{opts.timeout_s:g}s",
        )
    else:
        config.update(
            users=opts.users,
            spawn_rate=opts.spawn_rate,
            shape=opts.shape,
            user_rps=opts.user_rps or "no pause (back to back)",
        )
        if opts.shape == "step":
            config["steps"] = opts.steps
    return config


def settings_line(config: Mapping[str, Any]) -> str:
    """The settings on one line (``key=value`` for those that are set)."""
    skip = {"url", "binary", "samples"}
    return " ".join(
        f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in config.items()
        if k not in skip and v not in (None, "", 0, False)
    )


def metrics_urls(opts: LoadTestOptions) -> list[str]:
    """The ``/metrics`` URLs to scrape around the run."""
    if opts.metrics_urls is not None:
        return opts.metrics_urls
    return [f"{u}/metrics" for u in opts.targets]


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


@dataclass
class Prepared:
    """A test checked and ready to run: its samples, engine job, settings, scrape list."""

    samples: Path | None
    job: EngineJob
    config: dict[str, Any]
    headers: dict[str, str]
    scrape: list[str]
    check: Outcome | None = None


def prepare(opts: LoadTestOptions) -> Prepared:
    """Check the gateway, the model and one request of the test before any load.

    Creates the report folder. LoadTestError says what is wrong (unreachable gateway,
    unknown model, a request the model refuses, a bad samples file).
    """
    mode = opts.mode
    if mode == "closed":
        _require_locust()
        if len(opts.targets) > 1:
            raise LoadTestError("several --url need an open-loop run (--rate)")
    if opts.remote_workers and mode != "closed":
        raise LoadTestError("--remote-workers is for locust runs (without --rate)")
    headers = auth_headers(opts.api_key_env)
    samples = None
    if mode != "replay":
        try:
            fetch_metadata(opts.targets[0], opts.model, opts.model_version, headers)
        except GatewayError as e:
            raise LoadTestError(str(e)) from None
        samples = _samples(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / _RAW).unlink(missing_ok=True)
    job = engine_job(opts, samples)
    check = None
    if mode != "replay":
        try:
            check = check_model_request(job)
        except (GatewayError, ValueError) as e:
            raise LoadTestError(str(e)) from None
    return Prepared(samples, job, settings(opts, samples), headers, metrics_urls(opts), check)


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
        raw_path = opts.out / _RAW
        if not raw_path.is_file():
            raise LoadTestError(f"locust wrote no measurements; see {opts.out / 'locust.log'}")
        raw = json.loads(raw_path.read_text())
    else:
        result = _open_loop(opts, ready.job, progress)
        raw = result.measured.to_dict()
        raw["workers"] = opts.workers if opts.workers > 1 else 0
        generator = result.stats.to_dict()
        (opts.out / _RAW).write_text(json.dumps(raw))
    after = scrape_all(ready.scrape, ready.headers)
    summary = summarize(raw, ready.config)
    summary["generator"] = generator
    if ready.check is not None:  # sent before the load to the first gateway: not measured
        summary["check"] = {"status": ready.check.status, "version": ready.check.version}
    summary["server"] = breakdown(before, after) if ready.scrape else None
    results = write_report(opts.out, summary, opts.slos)
    return LoadTestResult(summary, results, opts.out)
