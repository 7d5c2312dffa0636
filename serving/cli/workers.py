"""``fermion serve --workers N``: N gateway processes on one port.

The supervisor (the process ``fermion serve`` started as) binds N sockets to the port
with SO_REUSEPORT, so that the kernel spreads connections over the workers, and starts
one ``fermion serve`` per socket (each with its own event loop, batchers and replicas;
backend ray: the same Ray applications). Every worker is a gateway of the fleet on the
shared control store. The supervisor forwards SIGTERM and SIGINT, restarts a worker
that dies once it had started, and stops when one fails at start.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.config import FermionConfig
from serving.http.v2 import stats_document
from serving.observability.host import HostSiblings

__all__ = ["WorkerSlot", "bind_listener", "supervise", "with_siblings"]

log = logging.getLogger("fermion.workers")

#: A worker that exits sooner than this after its start failed to start: the supervisor stops.
_START_GRACE_S = 20.0
#: Workers still running this long after their drain and grace periods are killed.
_STOP_MARGIN_S = 2.0


@dataclass(frozen=True)
class WorkerSlot:
    """Which worker a ``fermion serve`` process is: ``--worker INDEX,COUNT,FD,DIR``."""

    index: int
    count: int
    fd: int
    run_dir: Path

    @classmethod
    def parse(cls, text: str) -> WorkerSlot:
        """The slot written by the supervisor on a worker's command line."""
        index, count, fd, run_dir = text.split(",", 3)
        return cls(int(index), int(count), int(fd), Path(run_dir))

    def socket(self) -> socket.socket:
        """The listening socket the supervisor bound for this worker."""
        return socket.socket(fileno=self.fd)


def bind_listener(host: str, port: int, *, shared: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: one the OS picks), not yet listening.

    ``shared``: other workers' sockets may bind the same port (SO_REUSEPORT).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def with_siblings(app: Any, slot: WorkerSlot) -> ASGIApp:
    """``app`` answering its sibling workers' questions while it runs (metrics, stats)."""
    siblings = HostSiblings(slot.run_dir, slot.index, slot.count)
    app.state.siblings = siblings

    def metrics(_: list[str]) -> bytes:
        local = app.state.metrics
        return local.render() if local is not None else b""

    def stats(args: list[str]) -> bytes:
        name, version = (None if a == "-" else a for a in [*args, "-", "-"][:2])
        try:
            return orjson.dumps(stats_document(app.state.repository, name, version))
        except Exception:  # an unknown model here: this worker has nothing to add
            return b""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def lifespan_receive() -> Any:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await siblings.serve({"metrics": metrics, "stats": stats})
            elif message["type"] == "lifespan.shutdown":
                await siblings.close()
            return message

        await app(scope, lifespan_receive, send)

    return wrapped


def _worker_command(
    config: FermionConfig, args: argparse.Namespace, port: int, slot: str
) -> list[str]:
    # The supervisor already checked that there is something to serve; every worker
    # shares the gRPC port of the configuration (SO_REUSEPORT), as it shares the HTTP one.
    grpc_port = config.server.grpc_port
    command = [sys.executable, "-m", "serving.cli", "serve", "--port", str(port), "--worker", slot]
    command += ["--allow-empty", "--grpc-port", "off" if grpc_port is None else str(grpc_port)]
    for flag, value in (
        ("--config", args.config),
        ("--store", args.store),
        ("--host", args.host),
        ("--backend", args.backend),
        ("--keys-file", args.keys_file),
    ):
        if value is not None:
            command += [flag, str(value)]
    return command


def supervise(config: FermionConfig, args: argparse.Namespace) -> int:
    """Run ``config.server.workers`` workers until SIGTERM/SIGINT; the exit code."""
    host, count = config.server.host, config.server.workers
    first = bind_listener(host, config.server.port, shared=True)
    port = first.getsockname()[1]
    run_dir = Path(tempfile.mkdtemp(prefix="fermion-workers-"))
    stopping = False
    procs: list[subprocess.Popen[bytes] | None] = [None] * count
    started = [0.0] * count

    def spawn(i: int, sock: socket.socket | None = None) -> None:
        sock = sock or bind_listener(host, port, shared=True)
        slot = f"{i},{count},{sock.fileno()},{run_dir}"
        with sock:
            procs[i] = subprocess.Popen(
                _worker_command(config, args, port, slot), pass_fds=(sock.fileno(),)
            )
        started[i] = time.monotonic()

    signalled: set[int] = set()  # the pids already told to stop

    def stop(signum: int, frame: FrameType | None) -> None:
        # The workers get the signal the supervisor got: SIGTERM drains, SIGINT stops now.
        # Once each: a worker takes a second signal as "stop now", which ends its drain.
        nonlocal stopping
        stopping = True
        for p in procs:
            if p is not None and p.pid not in signalled and p.poll() is None:
                signalled.add(p.pid)
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        spawn(0, first)
        for i in range(1, count):
            spawn(i)
        log.info("supervising %d workers on port %d", count, port)
        while not stopping:
            time.sleep(0.2)
            for i, p in enumerate(procs):
                if p is None or p.poll() is None or stopping:
                    continue
                if time.monotonic() - started[i] < _START_GRACE_S:
                    print(f"fermion: worker {i} failed to start ({p.returncode})", file=sys.stderr)
                    code = p.returncode or 3
                    stop(signal.SIGTERM, None)
                    break
                log.warning("worker %d exited with %s; starting it again", i, p.returncode)
                spawn(i)
    finally:
        stop(signal.SIGTERM, None)  # the workers not told yet (one started as a signal came)
        stop_wait_s = config.server.drain_s + config.server.shutdown_grace_s + _STOP_MARGIN_S
        deadline = time.monotonic() + stop_wait_s
        for p in procs:
            if p is None:
                continue
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error(
                    "worker pid %d still running %gs after SIGTERM: killed", p.pid, stop_wait_s
                )
                p.kill()
                p.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
    return code
