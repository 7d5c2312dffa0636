"""A real ``redis-server`` on a free loopback port, started and stopped by PID.

It keeps nothing on disk: a restart on the same port comes back empty, as a Redis
that lost its data does.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.servers import free_port

__all__ = ["RedisServer", "start_redis", "stop_redis"]


@dataclass
class RedisServer:
    """One ``redis-server`` process."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        """The URL a gateway's ``control.store`` takes."""
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *args: str) -> str:
        """Run one command (inline protocol) and return the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.recv(65536).decode(errors="replace")


def start_redis(workdir: Path, port: int | None = None, timeout_s: float = 10.0) -> RedisServer:
    """Start ``redis-server`` on ``port`` (a free one if None) and wait until it answers."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run `make redis` (apt-get)")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / f"redis-{port}.log").open("ab") as log:
        process = subprocess.Popen(
            [
                binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(workdir),
                "--daemonize", "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = RedisServer(process, port, workdir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        try:
            if "PONG" in server.command("PING"):
                return server
        except OSError:
            time.sleep(0.05)
    stop_redis(server)
    raise RuntimeError(f"redis-server did not answer on port {port} in {timeout_s}s")


def stop_redis(server: RedisServer, *, kill: bool = False) -> None:
    """Stop the server by its PID (``kill``: SIGKILL, as a crash would)."""
    if server.process.poll() is None:
        if kill:
            server.process.kill()
        else:
            server.process.terminate()
        server.process.wait(timeout=10)
