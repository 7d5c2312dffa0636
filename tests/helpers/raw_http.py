"""The gateway on port 0 with process limits, and raw-socket HTTP for clients that misbehave."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from tests.helpers.servers import REPO_ROOT, RunningServer

__all__ = [
    "error_of",
    "exchange",
    "read_response",
    "rss_mb",
    "start_on_port_zero",
    "wait_until",
]

_LISTENING = re.compile(rb"Fermion listening on http://127\.0\.0\.1:(\d+)")


def start_on_port_zero(
    store: Path,
    tmp: Path,
    config_yaml: str = "",
    *,
    open_files: int | None = None,
    ready_path: str = "/v2/health/ready",
    timeout_s: float = 60.0,
) -> RunningServer:
    """``fermion serve --port 0``, with at most ``open_files`` descriptors; waits until ready."""
    config_path = tmp / f"fermion-{time.monotonic_ns()}.yaml"
    config_path.write_text(config_yaml)
    log_path = config_path.with_suffix(".log")

    def limit() -> None:
        if open_files is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, hard))

    command = [sys.executable, "-m", "serving.cli", "serve", "--config", str(config_path)]
    command += ["--store", str(store), "--host", "127.0.0.1", "--port", "0", "--grpc-port", "off"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            preexec_fn=limit if open_files is not None else None,
        )
    deadline = time.monotonic() + timeout_s
    port = 0
    while time.monotonic() < deadline and not port:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        if match := _LISTENING.search(log_path.read_bytes()):
            port = int(match.group(1))
        time.sleep(0.05)
    server = RunningServer(process, f"http://127.0.0.1:{port}", port, log_path)
    while time.monotonic() < deadline:
        status, _, _ = exchange(port, f"GET {ready_path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        if status == 200:
            return server
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise RuntimeError(f"{ready_path} never answered 200:\n{server.log()}")


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from ``sock``: status (0 when closed first), headers, body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, {}, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def exchange(
    port: int, request: bytes, timeout_s: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` on a new connection and read one response (status 0: none came)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(request)
            return read_response(sock)
    except OSError:
        return 0, {}, b""


def error_of(body: bytes) -> str:
    """The message of a V2 error body."""
    message: str = orjson.loads(body)["error"]
    return message


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of process ``pid`` from /proc (VmRSS, VmHWM...), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise LookupError(field)


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``check`` until it is true, or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout_s} s: {what}")
        time.sleep(0.05)
