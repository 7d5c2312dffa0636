"""A small open-loop HTTP/1.1 load generator: requests leave on a schedule, answered or not.

A closed loop (each client waits for its answer before sending again) slows down with
the server and hides overload; here request ``i`` is due at ``start + i / rate`` whatever
happened to the others, on a pool of keep-alive connections (a new one is opened when
none is idle), and its latency counts from when it was due. It runs on its own uvloop
loop with no task or timer per request, so that on a 2-core machine it leaves the CPU
to the server. Used by the overload tests and ``bench/overload.py``; ``fermion loadtest
--rate`` is the tool for users.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import cast

import uvloop

__all__ = ["OpenLoopResult", "closed_loop", "http_request", "open_loop"]


def http_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """The bytes of one ``POST path`` with ``body`` (keep-alive)."""
    head = [f"POST {path} HTTP/1.1", "Host: gateway", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class OpenLoopResult:
    """What came back for the requests sent at ``rate`` for ``duration_s``."""

    rate: float
    duration_s: float
    sent: int = 0
    #: Status -> answers.
    statuses: Counter[int] = field(default_factory=Counter)
    #: 503 and 429 answers without a Retry-After header.
    refused_without_retry_after: int = 0
    #: Requests whose connection failed (refused, reset, closed before the answer).
    errors: int = 0
    #: Requests not answered within the client's timeout.
    hangs: int = 0
    #: Seconds from when each 200 was due to its answer.
    ok_latencies: list[float] = field(default_factory=list)
    #: Connections opened.
    connections: int = 0

    @property
    def ok(self) -> int:
        """Requests answered 200."""
        return self.statuses[200]

    @property
    def refused(self) -> int:
        """Requests refused with 503 or 429."""
        return self.statuses[503] + self.statuses[429]

    @property
    def goodput(self) -> float:
        """200s per second of the run."""
        return self.ok / self.duration_s

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the 200s' latencies (seconds; 0 when none)."""
        if not self.ok_latencies:
            return 0.0
        ordered = sorted(self.ok_latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> str:
        """One line for a log or a report."""
        other = sum(v for k, v in self.statuses.items() if k not in (200, 429, 503))
        return (
            f"rate {self.rate:.0f}/s for {self.duration_s:.1f}s: sent {self.sent}, "
            f"200 {self.ok} ({self.goodput:.0f}/s), refused {self.refused}, other {other}, "
            f"errors {self.errors}, hangs {self.hangs}, connections {self.connections}, "
            f"p50 {self.quantile(0.5) * 1e3:.1f} ms, p99 {self.quantile(0.99) * 1e3:.1f} ms, "
            f"max {self.quantile(1.0) * 1e3:.1f} ms"
        )


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, owner: _Generator) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        #: When the request in flight was due (0: none in flight).
        self.due = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.owner.available(self)

    def send(self, due: float) -> None:
        assert self.transport is not None
        self.due = due
        self.transport.write(self.owner.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        length = 0
        retry_after = close = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name == b"content-length":
                length = int(value)
            elif name == b"retry-after":
                retry_after = True
            elif name == b"connection" and b"close" in value:
                close = True
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        due, self.due = self.due, 0.0
        if due:
            self.owner.answered(self, due, int(head[9:12]), retry_after, close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.lost(self)


class _Generator:
    def __init__(self, request: bytes, result: OpenLoopResult, timeout_s: float) -> None:
        self.request = request
        self.result = result
        self.timeout_s = timeout_s
        self.idle: list[_Connection] = []
        self.busy: set[_Connection] = set()
        self.waiting: deque[float] = deque()  # due times of requests waiting for a connection

    def available(self, conn: _Connection) -> None:
        """``conn`` can carry a request: the oldest waiting one still in time, or none yet."""
        now = time.perf_counter()
        while self.waiting:
            due = self.waiting.popleft()
            if now - due < self.timeout_s:
                self.busy.add(conn)
                conn.send(due)
                return
            self.result.hangs += 1
        self.busy.discard(conn)
        self.idle.append(conn)

    def answered(
        self, conn: _Connection, due: float, status: int, retry_after: bool, close: bool
    ) -> None:
        result = self.result
        result.statuses[status] += 1
        if status == 200:
            result.ok_latencies.append(time.perf_counter() - due)
        elif status in (429, 503) and not retry_after:
            result.refused_without_retry_after += 1
        if close and conn.transport is not None:
            self.busy.discard(conn)
            conn.transport.close()
            return
        self.available(conn)

    def lost(self, conn: _Connection) -> None:
        self.busy.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.due:
            self.result.errors += 1
            conn.due = 0.0

    def sweep(self, now: float) -> None:
        """Count and drop the requests past the client's timeout."""
        for conn in [c for c in self.busy if c.due and now - c.due >= self.timeout_s]:
            self.result.hangs += 1
            conn.due = 0.0
            self.busy.discard(conn)
            if conn.transport is not None:
                conn.transport.close()
        while self.waiting and now - self.waiting[0] >= self.timeout_s:
            self.waiting.popleft()
            self.result.hangs += 1


async def _run(
    host: str,
    port: int,
    request: bytes,
    rate: float,
    duration_s: float,
    timeout_s: float,
    max_connections: int,
) -> OpenLoopResult:
    loop = asyncio.get_running_loop()
    result = OpenLoopResult(rate=rate, duration_s=duration_s)
    gen = _Generator(request, result, timeout_s)
    opening: set[asyncio.Task[object]] = set()

    def connect() -> None:
        result.connections += 1
        task = loop.create_task(loop.create_connection(lambda: _Connection(gen), host, port))
        opening.add(task)

        def done(t: asyncio.Task[object]) -> None:
            opening.discard(t)
            if t.exception() is not None and gen.waiting:
                gen.waiting.popleft()
                result.errors += 1

        task.add_done_callback(done)

    start = time.perf_counter()
    total = int(rate * duration_s)
    next_sweep = start
    while result.sent < total:
        now = time.perf_counter()
        due_count = min(total, int((now - start) * rate) + 1)
        while result.sent < due_count:
            due = start + result.sent / rate
            result.sent += 1
            if gen.idle:
                conn = gen.idle.pop()
                gen.busy.add(conn)
                conn.send(due)
            else:
                gen.waiting.append(due)
                if len(gen.busy) + len(gen.idle) + len(opening) < max_connections:
                    connect()
        if now >= next_sweep:
            gen.sweep(now)
            next_sweep = now + 0.05
        await asyncio.sleep(max(0.0, min(0.005, start + result.sent / rate - time.perf_counter())))
    end = time.perf_counter() + timeout_s
    while (gen.busy or gen.waiting) and time.perf_counter() < end + 0.1:
        gen.sweep(time.perf_counter())
        await asyncio.sleep(0.02)
    gen.sweep(time.perf_counter() + timeout_s)
    for task in opening:
        task.cancel()
    for conn in [*gen.idle, *gen.busy]:
        if conn.transport is not None:
            conn.transport.close()
    await asyncio.sleep(0)
    return result


def open_loop(
    host: str,
    port: int,
    request: bytes,
    *,
    rate: float,
    duration_s: float,
    timeout_s: float = 5.0,
    max_connections: int = 1024,
) -> OpenLoopResult:
    """Send ``request`` ``rate`` times a second for ``duration_s``; wait for the stragglers."""
    return uvloop.run(_run(host, port, request, rate, duration_s, timeout_s, max_connections))


async def _closed(
    host: str, port: int, request: bytes, connections: int, duration_s: float, status: int
) -> float:
    answered = 0
    stop = time.perf_counter() + duration_s

    async def client() -> None:
        nonlocal answered
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < stop:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                answered += int(head[9:12]) == status
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    return answered / (time.perf_counter() - started)


def closed_loop(
    host: str,
    port: int,
    request: bytes,
    *,
    connections: int,
    duration_s: float,
    status: int = 200,
) -> float:
    """``status`` answers (200s) per second from ``connections`` clients, each sending as
    soon as it is answered: the server's capacity for ``request``."""
    return uvloop.run(_closed(host, port, request, connections, duration_s, status))
