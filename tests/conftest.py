"""Shared fixtures: one demo model store per session, and a real server subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from model_store.manifest import ModelManifest
from model_store.store import ModelStore

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RunningServer:
    """A ``fermion serve`` subprocess on a loopback port."""

    process: subprocess.Popen[bytes]
    url: str
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(
    store: Path,
    tmp: Path,
    config_yaml: str = "",
    timeout_s: float = 60.0,
    *,
    config_path: Path | None = None,
    ready_path: str = "/v2/health/ready",
) -> RunningServer:
    """Start ``fermion serve`` on a free port and wait until ``ready_path`` answers 200."""
    port = free_port()
    if config_path is None:  # else: a file the caller keeps across restarts
        config_path = tmp / f"fermion-{port}.yaml"
        config_path.write_text(config_yaml)
    config = config_path
    log_path = tmp / f"server-{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving.cli",
                "serve",
                "--config",
                str(config),
                "--store",
                str(store),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
        )
    server = RunningServer(process, f"http://127.0.0.1:{port}", port, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + ready_path, timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"{ready_path} not 200 after {timeout_s}s:\n{server.log()}")


def stop_server(server: RunningServer) -> None:
    """Stop the server we started, by its PID."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=5)


@dataclass(frozen=True)
class PublishedDemo:
    """The demo published into a store of its own, and how long that took."""

    store: ModelStore
    manifests: list[ModelManifest]
    seconds: float


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> PublishedDemo:
    """Both demo versions, trained and published once for the whole session."""
    from compilers.demo import publish_demo

    store = ModelStore(tmp_path_factory.mktemp("demo-store"))
    start = time.perf_counter()
    manifests = publish_demo(store)
    return PublishedDemo(store=store, manifests=manifests, seconds=time.perf_counter() - start)


@pytest.fixture(scope="session")
def demo_store(demo: PublishedDemo) -> ModelStore:
    """A store holding the two trained demo versions of ``digits`` (shared, never modified)."""
    return demo.store
