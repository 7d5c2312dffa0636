"""Fermion's guarded connections next to uvicorn's plain httptools protocol, in one run.

First the protocol alone (a request fed to it with no socket, guarded vs plain). Then
both servers run the same gateway app (``create_app``) on the demo model; only the
HTTP protocol differs: ``guarded`` is ``fermion serve`` (``GuardedHttpProtocol``: head
limits, read timeouts, refusal of overloaded requests from their head), ``plain`` is
uvicorn's own ``httptools`` protocol, where a refusal comes from the application after
the request went through the middleware. Two measurements:

- hot path: one-row JSON requests from a closed loop of 32 connections, the cells
  interleaved (guarded, plain, guarded, plain...): requests per second and server CPU
  per request, and the guarded/plain ratios (the limits must cost next to nothing);
- overload: an open loop at 1.5x and 3x each server's capacity (``max_queue_size``
  32): goodput as a share of capacity, refusals, requests never answered in 5 s, and
  the latency of the 200s.

    python -m bench.overload --store model_store [--duration 5] [--rounds 3]

The machine must be quiet: on a busy 2-core host the load generator and the server
fight for the cores, and the overload figures say more about the host than the server.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvloop

from bench._procs import ServerProcess, cpu_seconds, free_port
from tests.helpers.open_loop import closed_loop, http_request, open_loop

__all__ = ["main"]

_CONFIG = "batching:\n  max_queue_size: 32\n  max_batch_size: 64\n"


def _serve_plain(port: int, store: str, config_path: str) -> None:
    """The gateway app on uvicorn's plain httptools protocol (the comparison)."""
    import uvicorn

    from serving.config import load_config
    from serving.http.app import create_app

    config = load_config(config_path, {"store.root": store})
    app = create_app(config)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


def _servers(store: str, work: Path) -> dict[str, ServerProcess]:
    config = work / "fermion.yaml"
    config.write_text(_CONFIG)
    servers = {}
    for name in ("guarded", "plain"):
        port = free_port()
        if name == "guarded":
            argv = [
                sys.executable,
                "-m",
                "serving.cli",
                "serve",
                "--config",
                str(config),
                "--store",
                store,
                "--port",
                str(port),
                "--grpc-port",
                "off",
            ]
        else:
            argv = [
                sys.executable,
                "-m",
                "bench.overload",
                "--serve-plain",
                str(port),
                "--store",
                store,
                "--config",
                str(config),
            ]
        servers[name] = ServerProcess(name, argv, f"http://127.0.0.1:{port}", work / f"{name}.log")
    return servers


def _request() -> bytes:
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    tensor = {
        "name": "input",
        "shape": [1, 1, 28, 28],
        "datatype": "FP32",
        "data": x.ravel().tolist(),
    }
    body = orjson.dumps({"inputs": [tensor]})
    return http_request("/v2/models/digits/infer", body, {"Content-Type": "application/json"})


class _NullTransport:
    """Enough of a transport for a protocol to answer into nothing."""

    def __init__(self) -> None:
        self.closing = False

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, key: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(key, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _protocol_us(protocol: type[asyncio.Protocol], request: bytes, n: int) -> float:
    """CPU microseconds per request of ``protocol`` alone, answering from a trivial app."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    config = Config(
        app, loop="none", lifespan="off", proxy_headers=False, access_log=False, log_level="warning"
    )
    config.load()
    conn: Any = protocol(config=config, server_state=ServerState(), app_state={})  # type: ignore[call-arg]
    conn.connection_made(_NullTransport())
    started = time.process_time()
    for _ in range(n):
        conn.data_received(request)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    used = time.process_time() - started
    conn.connection_lost(None)
    return used / n * 1e6


def _protocols(request: bytes, rounds: int) -> None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from serving.http.connection import ConnectionLimits, guarded_protocol
    from serving.http.drain import DrainState

    kinds: dict[str, type[asyncio.Protocol]] = {
        "guarded": guarded_protocol(ConnectionLimits(), DrainState()),
        "plain": HttpToolsProtocol,
    }
    cells: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(rounds):
        for name, kind in kinds.items():
            cells[name].append(uvloop.run(_protocol_us(kind, request, 20_000)))
    us = {name: statistics.median(v) for name, v in cells.items()}
    print("the protocol alone (same one-row request, a trivial app, no socket):")
    for name, value in us.items():
        print(f"  {name:8s} {value:6.2f} us CPU/request")
    print(f"  guarded/plain: x{us['guarded'] / us['plain']:.2f}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="model_store")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve-plain", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_plain is not None:
        _serve_plain(args.serve_plain, args.store, args.config)
        return 0
    request = _request()
    _protocols(request, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        servers = _servers(args.store, Path(tmp))
        try:
            for s in servers.values():
                s.start()
            for s in servers.values():
                s.wait_ready()
            hot: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
            for _ in range(args.rounds):
                for name, s in servers.items():
                    port = int(s.base_url.rsplit(":", 1)[1])
                    before, started = cpu_seconds(s.pid), time.monotonic()
                    rate = closed_loop(
                        "127.0.0.1", port, request, connections=32, duration_s=args.duration
                    )
                    used = cpu_seconds(s.pid) - before
                    hot[name].append((rate, used / (rate * (time.monotonic() - started))))
            print("hot path, one-row JSON, closed loop of 32 connections (median of rounds):")
            medians = {}
            for name, cells in hot.items():
                rate = statistics.median(c[0] for c in cells)
                cpu = statistics.median(c[1] for c in cells)
                medians[name] = (rate, cpu)
                print(f"  {name:8s} {rate:8.0f} req/s  {cpu * 1e6:6.0f} us CPU/request")
            (g_rate, g_cpu), (p_rate, p_cpu) = medians["guarded"], medians["plain"]
            print(f"  guarded/plain: throughput x{g_rate / p_rate:.2f}, CPU x{g_cpu / p_cpu:.2f}")
            print("overload, open loop (max_queue_size 32, client timeout 5 s):")
            for multiple in (1.5, 3.0):
                for name, s in servers.items():
                    port = int(s.base_url.rsplit(":", 1)[1])
                    capacity = medians[name][0]
                    r = open_loop(
                        "127.0.0.1",
                        port,
                        request,
                        rate=multiple * capacity,
                        duration_s=args.duration,
                    )
                    print(
                        f"  x{multiple} {name:8s} goodput {r.goodput / capacity:4.0%} of "
                        f"capacity; {r.summary()}"
                    )
                    time.sleep(2)
        finally:
            for s in servers.values():
                s.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
