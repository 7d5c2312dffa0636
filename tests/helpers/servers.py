"""The real gateway as a subprocess: start ``fermion serve``, wait until it is ready, stop it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench._procs import process_tree

__all__ = ["REPO_ROOT", "RunningServer", "free_port", "start_server", "stop_server"]

#: The checkout's root: the working directory of every subprocess the tests start.
REPO_ROOT = Path(__file__).resolve().parents[2]


#: What ``fermion serve`` prints once it listens, with the port it got.
_LISTENING = re.compile(r"^Fermion listening on (http://127\.0\.0\.1:(\d+))$", re.MULTILINE)
_GRPC_LISTENING = re.compile(r"^Fermion gRPC listening on (\S+)$", re.M)


def free_port() -> int:
    """A TCP port on loopback that nothing listened on a moment ago.

    The port is released before this returns, so another process may take it: only for
    servers that cannot bind port 0 themselves (Redis, Prometheus, KServe's model server).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RunningServer:
    """A ``fermion serve`` subprocess on a loopback port (the one it bound and printed)."""

    process: subprocess.Popen[bytes]
    #: Its base URL and port, once it printed where it listens ("" and 0 until then).
    url: str
    port: int
    log_path: Path
    #: ``host:port`` of its gRPC server (None: started without gRPC).
    grpc_address: str | None = None
    #: The ``--config`` file it was started with (which it rewrites on route changes).
    config_path: Path | None = None

    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")


def start_server(
    store: Path,
    tmp: Path,
    config_yaml: str = "",
    timeout_s: float = 60.0,
    *,
    config_path: Path | None = None,
    ready_path: str = "/v2/health/ready",
    grpc: bool = False,
    port: int | None = None,
) -> RunningServer:
    """Start ``fermion serve`` and wait until ``ready_path`` answers 200.

    ``port`` None (the default): the server binds port 0 (no other process can take the
    port between its choice and its use) and says which port it got once it listens; a
    given port is for a restart that must come back where it was. ``grpc``: also serve
    gRPC on a port it binds itself (``RunningServer.grpc_address``); else off.
    """
    if config_path is None:  # else: a file the caller keeps across restarts
        config_path = _new_file(tmp, "fermion-", ".yaml")
        config_path.write_text(config_yaml)
    log_path = _new_file(tmp, "server-", ".log")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving.cli",
                "serve",
                "--config",
                str(config_path),
                "--store",
                str(store),
                "--host",
                "127.0.0.1",
                "--port",
                "0" if port is None else str(port),
                "--grpc-port",
                "0" if grpc else "off",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
        )
    deadline = time.monotonic() + timeout_s
    server = RunningServer(process, "", 0, log_path, config_path=config_path)
    while not server.url:
        listening = _LISTENING.search(server.log())
        if listening is not None:
            server.url, server.port = listening[1], int(listening[2])
        elif process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        elif time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"not listening after {timeout_s}s:\n{server.log()}")
        else:
            time.sleep(0.1)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + ready_path, timeout=1.0).status_code == 200:
                if grpc:
                    found = _GRPC_LISTENING.search(server.log())
                    assert found is not None, server.log()
                    server.grpc_address = found.group(1)
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"{ready_path} not 200 after {timeout_s}s:\n{server.log()}")


def _new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """A new, empty file in ``folder`` with a name no other file there has."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.close(fd)
    return Path(name)


def stop_server(server: RunningServer) -> None:
    """Stop the server we started, by its PID (SIGINT: at once, without a drain period)."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)  # SIGTERM would wait out server.drain_s
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            # Its workers (--workers) too: killed alone, it would leave them running.
            for pid in process_tree(server.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            server.process.wait(timeout=5)
