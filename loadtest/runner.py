"""Run a load test: locust headless in subprocesses (one, or a master and N workers),
then the report folder and the SLO verdict.

Locust monkey-patches the process it runs in (gevent), so it never runs in this one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from loadtest.payloads import find_samples
from loadtest.report_html import render_html
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
]

#: The exit status of ``fermion loadtest`` when an SLO was missed.
EXIT_SLO_MISSED: Final = 1

_HERE = Path(__file__).resolve().parent
_LOCUSTFILES: Final = f"{_HERE / 'locustfile.py'},{_HERE / 'shapefile.py'}"
_STOP_TIMEOUT_S: Final = 10
_RAW: Final = "raw.json"


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
    #: ``http`` (``url`` is the base URL) or ``grpc`` (``url`` is ``grpc://host:port``).
    protocol: str = "http"
    slos: list[Slo] = field(default_factory=list)
    workers: int = 1
    remote_workers: int = 0
    master_bind: str = "127.0.0.1"
    master_port: int | None = None


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
        "--protocol",
        opts.protocol,
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


def _preflight_grpc(opts: LoadTestOptions) -> None:
    import grpc

    from loadtest.grpc_client import grpc_address, model_metadata

    key = os.environ.get(opts.api_key_env, "")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    address = grpc_address(opts.url)
    try:
        model_metadata(address, opts.model, opts.model_version, headers, 10.0)
    except grpc.RpcError as e:
        raise LoadTestError(
            f"gRPC ModelMetadata at {address}: {e.code().name} {e.details()}"
        ) from None


def _preflight(opts: LoadTestOptions) -> None:
    if opts.protocol == "grpc":
        _preflight_grpc(opts)
        return
    path = f"/v2/models/{opts.model}"
    if opts.model_version:
        path += f"/versions/{opts.model_version}"
    headers = {}
    key = os.environ.get(opts.api_key_env, "")
    if key:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(opts.url.rstrip("/") + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            json.loads(response.read())
    except urllib.error.HTTPError as e:
        body = e.read()[:300].decode("utf-8", errors="replace")
        raise LoadTestError(f"GET {request.full_url}: HTTP {e.code} {body}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise LoadTestError(f"GET {request.full_url}: {e}") from None


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


def _run_processes(
    opts: LoadTestOptions, samples: Path | None, echo: Callable[[str], None]
) -> None:
    distributed = opts.workers > 1 or opts.remote_workers > 0
    if distributed and opts.master_port is None:
        opts.master_port = _free_port(opts.master_bind)
    log = opts.out / "locust.log"
    logs: list[IO[bytes]] = []
    procs: list[subprocess.Popen[bytes]] = []
    env = _env()
    try:
        logs.append(log.open("wb"))
        main = subprocess.Popen(
            locust_command(opts, samples, distributed),
            stdout=logs[-1],
            stderr=subprocess.STDOUT,
            env=env,
        )
        procs.append(main)
        if distributed:
            assert opts.master_port is not None
            host = opts.master_bind
            if host in ("0.0.0.0", "", "*"):
                host = socket.gethostname()
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
        for f in logs:
            f.close()


def run_loadtest(opts: LoadTestOptions, echo: Callable[[str], None] = print) -> LoadTestResult:
    """Run the test ``opts`` describe and write its report folder (``opts.out``)."""
    _require_locust()
    _preflight(opts)
    samples = _samples(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / _RAW).unlink(missing_ok=True)
    inputs = f"samples from {samples}" if samples else "random inputs within the signature"
    echo(
        f"load test: {opts.url} model {opts.model}, {opts.users} users ({opts.shape}) "
        f"for {opts.duration_s:g}s, {inputs}"
    )
    _run_processes(opts, samples, echo)
    raw_path = opts.out / _RAW
    if not raw_path.is_file():
        raise LoadTestError(f"locust wrote no measurements; see {opts.out / 'locust.log'}")
    raw = json.loads(raw_path.read_text())
    config = {
        "url": opts.url,
        "protocol": opts.protocol,
        "model": opts.model,
        "model_version": opts.model_version,
        "users": opts.users,
        "spawn_rate": opts.spawn_rate,
        "duration": f"{opts.duration_s:g}s",
        "shape": opts.shape,
        "binary": opts.binary,
        "batch_size": opts.batch_size,
        "samples": str(samples) if samples else None,
        "workers": opts.workers + opts.remote_workers
        if opts.workers > 1 or opts.remote_workers
        else 0,
    }
    summary = summarize(raw, config)
    results = evaluate(opts.slos, summary)
    summary["slo"] = [r.to_dict() for r in results]
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_history(summary, opts.out / "history.csv")
    (opts.out / "report.html").write_text(render_html(summary))
    return LoadTestResult(summary, results, opts.out)
