"""A V2 inference server with known timing, for testing what load tests measure.

``python -m tests.helpers.paced_server [--rate R] [--stall-after S --stall-ms M]``
serves one model (``paced``: input ``x`` FP32 [-1, 4]) on a free loopback port and
prints ``port N`` once it listens.

- ``--rate R``: one request at a time, each taking exactly 1/R s of a virtual clock
  (a FIFO server whose capacity is R requests/s; its timer's overshoot never adds up).
- ``--stall-after S --stall-ms M``: S seconds after the first inference request, the
  whole server freezes for M ms (the event loop blocked, like a long GC pause).
- ``--max-batch-size B``: a request of more rows is refused with 400, as the gateway does.

It counts the requests it answered (``GET /stats``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from loadtest.payloads import HEADER_LENGTH

__all__ = ["PacedApp", "PacedServer", "main", "paced_server"]

MODEL = "paced"
METADATA = {
    "name": MODEL,
    "versions": ["1"],
    "platform": "paced",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
}

Send = Any
Receive = Any


class PacedApp:
    """The ASGI app: metadata, health, infer (paced, stalled once) and a request count."""

    def __init__(self, rate: float, stall_after: float, stall_ms: float, max_batch: int) -> None:
        self.rate = rate
        self.stall_after = stall_after
        self.stall_ms = stall_ms
        self.max_batch = max_batch
        self.answered = 0
        self._first: float | None = None
        self._stalled = False
        self._free_at = 0.0

    async def _reply(self, send: Send, status: int, doc: Any, headers: list[Any]) -> None:
        body = json.dumps(doc).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), *headers],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if method == "GET" and path in ("/v2/health/ready", "/v2/health/live"):
            await self._reply(send, 200, {}, [])
        elif method == "GET" and path == f"/v2/models/{MODEL}":
            await self._reply(send, 200, METADATA, [])
        elif method == "GET" and path == "/stats":
            await self._reply(send, 200, {"answered": self.answered}, [])
        elif method == "POST" and path.startswith(f"/v2/models/{MODEL}/"):
            await self._infer(scope, body, send)
        else:
            await self._reply(send, 404, {"error": f"no route for {path}"}, [])

    async def _infer(self, scope: dict[str, Any], body: bytes, send: Send) -> None:
        headers = dict(scope["headers"])
        length = headers.get(HEADER_LENGTH.encode())
        doc = json.loads(body[: int(length)] if length else body)
        rows = int(doc["inputs"][0]["shape"][0])
        if rows > self.max_batch:
            message = f"batch of {rows} rows is over the max batch size {self.max_batch}"
            await self._reply(send, 400, {"error": message}, [])
            return
        now = time.monotonic()
        if self._first is None:
            self._first = now
        if self.stall_ms and not self._stalled and now - self._first >= self.stall_after:
            self._stalled = True
            time.sleep(self.stall_ms / 1000.0)  # freeze everything, on purpose
        if self.rate > 0:
            loop = asyncio.get_running_loop()
            self._free_at = max(self._free_at, loop.time()) + 1.0 / self.rate
            await asyncio.sleep(self._free_at - loop.time())
        self.answered += 1
        out = {
            "model_name": MODEL,
            "model_version": "1",
            "outputs": [
                {"name": "y", "datatype": "FP32", "shape": [rows, 1], "data": [0.0] * rows}
            ],
        }
        await self._reply(send, 200, out, [(b"fermion-model-version", b"1")])


@dataclass
class PacedServer:
    """A running paced server: its base URL and process."""

    url: str
    process: subprocess.Popen[bytes]

    def answered(self) -> int:
        """Inference requests it answered so far."""
        import httpx

        count: int = httpx.get(f"{self.url}/stats", timeout=10).json()["answered"]
        return count


@contextmanager
def paced_server(*args: str) -> Iterator[PacedServer]:
    """Start ``python -m tests.helpers.paced_server ARGS``; stop it (by its PID) after."""
    from tests.helpers.servers import REPO_ROOT

    process = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.paced_server", *args],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        if not line.startswith("port "):
            raise RuntimeError(f"paced server did not start: {line!r}")
        yield PacedServer(f"http://127.0.0.1:{int(line.split()[1])}", process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()


def main(argv: list[str] | None = None) -> None:
    """Serve on a free loopback port; print ``port N`` once listening."""
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--stall-after", type=float, default=0.0)
    p.add_argument("--stall-ms", type=float, default=0.0)
    p.add_argument("--max-batch-size", type=int, default=64)
    args = p.parse_args(argv)
    app = PacedApp(args.rate, args.stall_after, args.stall_ms, args.max_batch_size)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)  # connections wait in the backlog until uvicorn accepts them
    config = uvicorn.Config(app, log_level="warning", access_log=False, backlog=4096)
    server = uvicorn.Server(config)
    print(f"port {sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1:])
