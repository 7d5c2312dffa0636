"""A small closed-loop load generator on asyncio for HTTP/1.1 and gRPC alike.

wrk cannot speak gRPC, so both transports are driven by this one generator in the same
run: ``concurrency`` workers each send fixed, pre-encoded requests back to back for a
while and time every answer. HTTP workers hold one keep-alive connection each and parse
no more than the status line and Content-Length; gRPC workers share one channel (one
HTTP/2 connection, as tritonclient uses) and send pre-serialized messages as bytes.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import numpy as np

__all__ = ["LoadResult", "grpc_sender", "http_sender", "run_closed_loop"]

#: Sends one request and returns once its answer is in (raises on a failed answer).
Send = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class LoadResult:
    """One cell: answers, failures, their latencies and the generator's own CPU."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    #: Cores the generator itself used (user + system time over the wall time).
    generator_cores: float
    first_error: str | None = None

    @property
    def rps(self) -> float:
        """Answers per second."""
        return self.requests / self.seconds if self.seconds else 0.0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_closed_loop(
    senders: list[Send], duration_s: float, warmup_s: float = 1.0
) -> LoadResult:
    """Each sender in a loop of its own; only answers after ``warmup_s`` are counted."""
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop = measure_from + duration_s
    cpu_at: list[float] = []

    async def worker(send: Send) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop:
                return
            try:
                await send()
            except Exception as e:  # a failed answer is counted, not fatal
                if t0 >= measure_from:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            if t0 >= measure_from:
                latencies.append(time.perf_counter() - t0)

    async def mark_cpu() -> None:
        await asyncio.sleep(warmup_s)
        cpu_at.append(_cpu())

    marker = asyncio.ensure_future(mark_cpu())
    await asyncio.gather(*(worker(s) for s in senders))
    await marker
    wall = max(time.perf_counter() - measure_from, 1e-9)
    ms = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    return LoadResult(
        requests=len(latencies),
        errors=len(errors),
        seconds=wall,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        generator_cores=(_cpu() - cpu_at[0]) / wall,
        first_error=errors[0] if errors else None,
    )


async def http_sender(
    host: str, port: int, path: str, body: bytes, headers: dict[str, str]
) -> Send:
    """A sender on one keep-alive HTTP/1.1 connection, posting ``body`` to ``path``."""
    reader, writer = await asyncio.open_connection(host, port)
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body

    async def send() -> None:
        writer.write(request)
        status = await reader.readuntil(b"\r\n")
        length = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        if not status.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(status.decode("latin-1").strip())

    return send


def grpc_sender(channel: grpc.aio.Channel, method: str, request: bytes) -> Send:
    """A sender of one pre-serialized unary call on ``channel`` (answer bytes not parsed)."""
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)

    async def send() -> None:
        await call(request)

    return send
