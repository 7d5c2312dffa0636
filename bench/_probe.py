"""Run ``fermion serve`` with probes: GC pauses, event-loop lag and per-request times.

    python -m bench._probe --out probe.json -- serve --store model_store --port 8000

The gateway runs in this process, unchanged, with three observers added around it:

- ``gc.callbacks``: every collection's generation, start and duration, and what it
  collected; the heap's tracked objects (by generation, frozen ones apart) at exit;
- an event-loop lag probe: a task that asks to wake up every millisecond and records
  how late it woke (a stall of the loop shows as one late wake-up);
- the outermost ASGI layer: when each inference request started and how long the
  server took to answer it (the body's last byte sent);
- ONNX Runtime's ``run`` in the inference threads: each batch's rows, wall time and
  the calling thread's own CPU time. With one intra-op thread (the default) ONNX
  Runtime computes in that thread, so wall time beyond CPU time is time the thread
  was not running: mostly waiting for the GIL to come back once the batch is done.

For experiments on any checkout, ``PROBE_FREEZE=1`` freezes the heap once the models
are loaded and ``PROBE_THRESHOLD=a,b,c`` sets the collector's thresholds.

The records go in preallocated ``array`` buffers (floats, not objects the collector
tracks), so that the probes do not change what they measure; ``--out`` gets them as
JSON when the server stops (SIGINT or SIGTERM).
"""

from __future__ import annotations

import array
import asyncio
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

_CAPACITY = 4_000_000
_RESPOND = "fermion.respond"  # serving.http.connection.RESPOND (checked in main)


class _Series:
    """Rows of floats in one flat ``array('d')`` (no per-row objects)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.data = array.array("d", bytes(8 * width * 1024))
        self.rows = 0

    def add(self, *values: float) -> None:
        if (self.rows + 1) * self.width > len(self.data):
            if len(self.data) >= _CAPACITY * self.width:
                return
            self.data.extend(array.array("d", bytes(8 * len(self.data))))
        base = self.rows * self.width
        for i, v in enumerate(values):
            self.data[base + i] = v
        self.rows += 1

    def table(self) -> list[list[float]]:
        w = self.width
        return [list(self.data[i * w : (i + 1) * w]) for i in range(self.rows)]


T0 = time.perf_counter()
GC = _Series(4)  # start s, generation, duration ms, collected
LAG = _Series(2)  # wake-up s, lateness ms
REQUESTS = _Series(2)  # start s, server time ms
BATCHES = _Series(4)  # start s, rows, wall ms, the thread's CPU ms
_gc_started = [0.0]


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    now = time.perf_counter()
    if phase == "start":
        _gc_started[0] = now
    else:
        start = _gc_started[0]
        GC.add(start - T0, info["generation"], (now - start) * 1e3, info["collected"])


async def _lag_probe(interval_s: float = 0.001) -> None:
    loop = asyncio.get_running_loop()
    while True:
        wanted = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        late = loop.time() - wanted
        LAG.add(wanted - T0 + 0.0, late * 1e3)


class _Timed:
    """Outermost ASGI layer: start and server time of each ``.../infer`` request."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._lag: asyncio.Task[None] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" and self._lag is None:
            self._lag = asyncio.get_running_loop().create_task(_lag_probe())
        if scope["type"] != "http" or not scope["path"].endswith("/infer"):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed_send(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                REQUESTS.add(start - T0, (time.perf_counter() - start) * 1e3)

        # The inference path answers through the connection's one-call responder
        # (``serving.http.connection.RESPOND``) where it has one, not through ``send``.
        extensions = scope.get("extensions") or {}
        respond = extensions.get(_RESPOND)
        if respond is not None:

            async def timed_respond(status: int, headers: Any, body: bytes) -> None:
                await respond(status, headers, body)
                REQUESTS.add(start - T0, (time.perf_counter() - start) * 1e3)

            scope = {**scope, "extensions": {**extensions, _RESPOND: timed_respond}}
        await self.app(scope, receive, timed_send)


def _time_batches() -> None:
    """Record each ONNX Runtime run's rows, wall time and the calling thread's CPU time."""
    from serving.inference.executors.onnxruntime import OnnxRuntimeExecutor

    run = OnnxRuntimeExecutor.run

    def timed_run(self: Any, inputs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        outputs = run(self, inputs)
        wall_ms = (time.perf_counter() - wall) * 1e3
        rows = next(iter(inputs.values())).shape[0] if inputs else 0
        BATCHES.add(wall - T0, rows, wall_ms, (time.thread_time() - cpu) * 1e3)
        return outputs

    OnnxRuntimeExecutor.run = timed_run  # type: ignore[method-assign]


def _heap() -> dict[str, int]:
    counts = {f"gen{g}": len(gc.get_objects(g)) for g in range(3)}
    counts["frozen"] = gc.get_freeze_count()
    return counts


def _write(out: Path) -> None:
    out.write_text(
        json.dumps(
            {
                "gc": GC.table(),
                "lag": LAG.table(),
                "requests": REQUESTS.table(),
                "batches": BATCHES.table(),
                "heap_at_exit": _heap(),
                "thresholds": list(gc.get_threshold()),
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    """``--out FILE -- <fermion arguments>``: run the gateway with the probes."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "--out" or args[2] != "--":
        print("usage: python -m bench._probe --out FILE -- serve ...", file=sys.stderr)
        return 2
    out, fermion_args = Path(args[1]), args[3:]
    import os

    if os.environ.get("PROBE_THRESHOLD"):
        gc.set_threshold(*[int(v) for v in os.environ["PROBE_THRESHOLD"].split(",")])
    if os.environ.get("PROBE_FREEZE"):
        from serving.inference.repository import ModelRepository

        start = ModelRepository.start

        async def start_and_freeze(self: Any) -> None:
            await start(self)
            gc.collect()
            gc.freeze()

        ModelRepository.start = start_and_freeze  # type: ignore[method-assign]
    import serving.http.app as app_module
    from serving.cli import main as fermion
    from serving.http.connection import RESPOND

    if RESPOND != _RESPOND:
        raise RuntimeError(f"the responder's key is {RESPOND!r} now: update bench/_probe.py")

    create_app = app_module.create_app

    def probed_create_app(*a: Any, **kw: Any) -> Any:
        return _Timed(create_app(*a, **kw))

    app_module.create_app = probed_create_app
    _time_batches()
    gc.callbacks.append(_on_gc)
    try:
        return fermion(fermion_args)
    finally:
        gc.callbacks.remove(_on_gc)
        _write(out)


if __name__ == "__main__":
    sys.exit(main())
