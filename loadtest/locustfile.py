"""Locust scenario for a Fermion gateway: V2 inference requests from simulated users.

Run by ``fermion loadtest`` (headless, with a load shape and a report), or on its own
for locust's web UI::

    locust -f loadtest/locustfile.py -H http://127.0.0.1:8000 --model digits
    locust -f loadtest/locustfile.py -H grpc://127.0.0.1:8001 --model digits --protocol grpc

Each user sends inference requests back to back (``--user-rps`` caps each user's rate)
with a sticky ``x-user-id`` header and, when ``$FERMION_API_KEY`` is set (the variable's
name is ``--api-key-env``), ``Authorization: Bearer <key>``. Bodies are built from the
model's metadata and ``--samples FILE.npz`` (random inputs without one). Each response's
served version (its ``fermion-model-version`` header or ``model_version`` field) names
its locust stats row (``infer v2``) so that A/B shares show under load. With
``--protocol grpc`` the users are ``GrpcInferenceUser`` instead: the same requests as V2
gRPC ``ModelInfer`` calls (``loadtest.grpc_client``), the same metadata, rows and report.
With ``--record FILE`` the master (or the only process) prints a progress line's figures each
second and writes per-second histograms there when it quits; ``fermion loadtest`` turns
those into its progress line and its report.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import types
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gevent  # type: ignore[import-untyped]
from gevent.lock import Semaphore  # type: ignore[import-untyped]
from locust import FastHttpUser, User, constant, constant_throughput, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtest.openloop import hist_percentile
from loadtest.payloads import (
    HEADER_LENGTH,
    VERSION_HEADER,
    Payload,
    build_payloads,
    error_message,
    infer_path,
    load_samples,
    served_version,
)
from loadtest.progress import PROGRESS_PREFIX, Progress
from loadtest.recorder import Recorder

__all__ = ["GrpcInferenceUser", "InferenceUser"]

_log = logging.getLogger("fermion.loadtest")
_STOP = "fermion_stop"
_FINAL = "fermion_final"

_recorder = Recorder()
_finals: set[str] = set()
_env: list[Environment] = []
_sampler: list[gevent.Greenlet] = []
_payload_lock = Semaphore()
_payload_cache: dict[tuple[Any, ...], list[Payload]] = {}


def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("fermion")
    group.add_argument("--model", default="digits", help="model to load-test")
    group.add_argument("--model-version", default="", help="pin one version (default: routed)")
    group.add_argument(
        "--protocol", choices=["http", "grpc"], default="http", help="V2 over HTTP or gRPC"
    )
    group.add_argument("--binary", action="store_true", default=False, help="binary tensors")
    group.add_argument("--batch-size", type=int, default=1, help="rows per request")
    group.add_argument("--samples", default="", help=".npz of real inputs (default: random)")
    group.add_argument("--user-rps", type=float, default=0.0, help="cap per user (0: none)")
    group.add_argument(
        "--api-key-env", default="FERMION_API_KEY", help="environment variable with the API key"
    )
    parser.add_argument(
        "--record", default="", include_in_web_ui=False, help="write measurements here (JSON)"
    )


def _listen(hook: Any, handler: Callable[..., Any]) -> None:
    hook.add_listener(handler)


def _opts(env: Environment) -> Any:
    opts = env.parsed_options
    if opts is None:
        raise RuntimeError("fermion's locustfile needs locust's command-line options")
    return opts


def _auth_headers(env: Environment) -> dict[str, str]:
    key = os.environ.get(_opts(env).api_key_env or "", "")
    return {"authorization": f"Bearer {key}"} if key else {}


def _payloads(env: Environment) -> list[Payload]:
    """This process's encoded requests, built once from the served model's metadata."""
    opts = _opts(env)
    key = (env.host, opts.model, opts.model_version, opts.binary, opts.batch_size, opts.samples)
    with _payload_lock:
        cached = _payload_cache.get(key)
        if cached is not None:
            return cached
        path = f"/v2/models/{opts.model}"
        if opts.model_version:
            path += f"/versions/{opts.model_version}"
        url = f"{(env.host or '').rstrip('/')}{path}"
        request = urllib.request.Request(url, headers=_auth_headers(env))
        with urllib.request.urlopen(request, timeout=30) as response:
            metadata = json.loads(response.read())
        samples = None
        if opts.samples:
            if Path(opts.samples).is_file():
                samples = load_samples(Path(opts.samples))
            else:
                _log.warning("samples file %s not found here: random inputs", opts.samples)
        payloads = build_payloads(metadata, samples, binary=opts.binary, batch_size=opts.batch_size)
        _payload_cache[key] = payloads
        return payloads


class InferenceUser(FastHttpUser):
    """A client sending V2 inference requests to one model, back to back."""

    protocol = "http"
    wait_time = constant(0)

    def on_start(self) -> None:
        opts = _opts(self.environment)
        self._payloads = _payloads(self.environment)
        self._path = infer_path(opts.model, opts.model_version or None)
        self._headers = {"x-user-id": uuid.uuid4().hex[:16], **_auth_headers(self.environment)}
        self._next = int.from_bytes(os.urandom(2), "little")
        if opts.user_rps > 0:
            pace = constant_throughput(opts.user_rps)
            self.wait_time = types.MethodType(pace, self)  # type: ignore[method-assign]

    @task
    def infer(self) -> None:
        """One inference request; its stats row is named after the version that served it."""
        payload = self._payloads[self._next % len(self._payloads)]
        self._next += 1
        headers = {**self._headers, **payload.headers}
        with self.client.post(
            self._path,
            data=payload.body,  # type: ignore[arg-type]  # bytes are sent as they are
            headers=headers,
            name="infer",
            catch_response=True,
        ) as resp:
            status = resp.status_code
            if status == 200:
                h = resp.headers
                version = served_version(
                    h.get(VERSION_HEADER), resp.content or b"", h.get(HEADER_LENGTH)
                )
                if version is not None:
                    resp.request_meta["name"] = f"infer v{version}"
                    resp.request_meta["context"]["version"] = version
                resp.success()
            elif status == 0:
                error = getattr(resp, "error", None)
                resp.failure(f"0 {type(error).__name__}: {error}")
            else:
                resp.failure(error_message(status, resp.content or b""))


_grpc_requests: dict[tuple[Any, ...], list[bytes]] = {}
_grpc_gevent: list[bool] = []


def _grpc_requests_for(env: Environment) -> list[bytes]:
    """This process's serialized ``ModelInferRequest`` messages, built once."""
    from loadtest.grpc_client import encode_requests, grpc_address, model_metadata
    from loadtest.payloads import build_tensors

    opts = _opts(env)
    key = (env.host, opts.model, opts.model_version, opts.batch_size, opts.samples)
    with _payload_lock:
        cached = _grpc_requests.get(key)
        if cached is not None:
            return cached
        address = grpc_address(env.host or "")
        headers = _auth_headers(env)
        metadata = model_metadata(address, opts.model, opts.model_version or None, headers, 30.0)
        samples = None
        if opts.samples:
            if Path(opts.samples).is_file():
                samples = load_samples(Path(opts.samples))
            else:
                _log.warning("samples file %s not found here: random inputs", opts.samples)
        tensors = build_tensors(metadata, samples, batch_size=opts.batch_size)
        requests = encode_requests(tensors, opts.model, opts.model_version or None)
        _grpc_requests[key] = requests
        return requests


class GrpcInferenceUser(User):
    """A client sending V2 gRPC ``ModelInfer`` calls to one model, back to back.

    ``-H`` is the gRPC address (``grpc://host:port``); the sticky ``x-user-id`` and the
    API key travel as metadata. Its rows and errors are recorded as ``InferenceUser``'s.
    """

    protocol = "grpc"
    wait_time = constant(0)

    def on_start(self) -> None:
        from loadtest.grpc_client import GrpcInfer, grpc_address, init_gevent

        with _payload_lock:
            if not _grpc_gevent:  # before this process's first channel
                init_gevent()
                _grpc_gevent.append(True)
        opts = _opts(self.environment)
        self._requests = _grpc_requests_for(self.environment)
        self._client = GrpcInfer(grpc_address(self.environment.host or ""))
        headers = {"x-user-id": uuid.uuid4().hex[:16], **_auth_headers(self.environment)}
        self._metadata = tuple(headers.items())
        self._next = int.from_bytes(os.urandom(2), "little")
        if opts.user_rps > 0:
            pace = constant_throughput(opts.user_rps)
            self.wait_time = types.MethodType(pace, self)  # type: ignore[method-assign]

    def on_stop(self) -> None:
        self._client.close()

    @task
    def infer(self) -> None:
        """One ``ModelInfer`` call; its stats row is named after the version that served it."""
        request = self._requests[self._next % len(self._requests)]
        self._next += 1
        answer = self._client(request, self._metadata)
        version = answer.version
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"infer v{version}" if version is not None else "infer",
            response_time=answer.seconds * 1000.0,
            response_length=answer.size,
            exception=None if answer.error is None else RuntimeError(answer.error),
            context={"version": version},
        )


def _on_request(
    name: str,
    response_time: float,
    exception: BaseException | None = None,
    context: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    if not name.startswith("infer"):
        return
    error = None
    if exception is not None:
        error = str(exception)
        if not error[:1].isdigit():
            error = f"0 {type(exception).__name__}: {error}"
    _recorder.record(time.time(), response_time, (context or {}).get("version"), error)


def _on_init(environment: Environment, **_: Any) -> None:
    _env[:] = [environment]
    runner = environment.runner
    protocol = getattr(environment.parsed_options, "protocol", "http")
    if not isinstance(runner, WorkerRunner):  # a worker spawns what its master names
        chosen = [c for c in environment.user_classes if getattr(c, "protocol", "") == protocol]
        if chosen:
            environment.user_classes[:] = chosen
    if isinstance(runner, WorkerRunner):
        runner.register_message(_STOP, _worker_stop, concurrent=True)
    elif isinstance(runner, MasterRunner):
        runner.register_message(_FINAL, _master_final)


def _on_report_to_master(client_id: str, data: dict[str, Any]) -> None:
    data["fermion"] = _recorder.drain()


def _on_worker_report(client_id: str, data: dict[str, Any]) -> None:
    if "fermion" in data:
        _recorder.merge(data["fermion"])


def _worker_stop(environment: Environment, msg: Any, **_: Any) -> None:
    """The master asks for a final report: stop the users gracefully, then send it."""
    assert environment.runner is not None
    environment.runner.stop()
    environment.runner.send_message(_FINAL, _recorder.drain())


def _master_final(environment: Environment, msg: Any, **_: Any) -> None:
    _recorder.merge(msg.data)
    _finals.add(msg.node_id)


def _progress(environment: Environment, started: float, window: list[Any]) -> None:
    """Print the progress line's figures (a 3-second window) for ``fermion loadtest``."""
    total = environment.stats.total
    now = (time.monotonic(), total.num_requests, total.num_failures, dict(total.response_times))
    window.append(now)
    del window[:-4]
    then = window[0]
    span = now[0] - then[0]
    recent = {
        int(ms * 1000): n - then[3].get(ms, 0) for ms, n in now[3].items() if n > then[3].get(ms, 0)
    }
    progress = Progress(
        elapsed_s=now[0] - started,
        rate=(now[1] - then[1]) / span if span > 0 else 0.0,
        p50_ms=hist_percentile(recent, 0.5),
        p99_ms=hist_percentile(recent, 0.99),
        requests=now[1],
        errors=now[2],
        users=environment.runner.user_count if environment.runner else None,
    )
    sys.stdout.buffer.write(PROGRESS_PREFIX + json.dumps(asdict(progress)).encode() + b"\n")
    sys.stdout.flush()


def _sample_users(environment: Environment) -> None:
    runner = environment.runner
    show = bool(_opts(environment).record)
    started = time.monotonic()
    window: list[Any] = []
    while runner is not None:
        _recorder.sample_users(time.time(), runner.user_count)
        if show:
            _progress(environment, started, window)
        gevent.sleep(1.0)


def _on_test_start(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    for g in _sampler:
        g.kill(block=False)
    _sampler[:] = [gevent.spawn(_sample_users, environment)]


def _on_test_stopping(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        return
    for g in _sampler:
        g.kill(block=False)
    _sampler.clear()
    _recorder.sample_users(time.time(), runner.user_count if runner else 0)
    if not isinstance(runner, MasterRunner):
        return
    # Ask every worker for its last measurements before the master quits (locust's own
    # final report is sent on quit and only waited for half a second).
    pending = {c.id for c in runner.clients.all}
    runner.send_message(_STOP)
    deadline = time.monotonic() + (environment.stop_timeout or 0) + 15.0
    while not pending <= _finals and time.monotonic() < deadline:
        gevent.sleep(0.05)
    if not pending <= _finals:
        _log.warning("no final report from worker(s) %s", ", ".join(sorted(pending - _finals)))


def _on_quit(exit_code: int, **_: Any) -> None:
    if not _env or isinstance(_env[0].runner, WorkerRunner):
        return
    env = _env[0]
    path = _opts(env).record
    if not path:
        return
    data = _recorder.to_dict()
    data["workers"] = len(_finals) if isinstance(env.runner, MasterRunner) else 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data))


_listen(events.init_command_line_parser, _add_arguments)
_listen(events.request, _on_request)
_listen(events.init, _on_init)
_listen(events.report_to_master, _on_report_to_master)
_listen(events.worker_report, _on_worker_report)
_listen(events.test_start, _on_test_start)
_listen(events.test_stopping, _on_test_stopping)
_listen(events.quit, _on_quit)
