"""Dynamic batching per model version: a bounded queue in front of one batch runner.

When a runner slot is free a request is dispatched at once (no waiting at low
load); while batches run, arrivals gather into the next batch. A request whose
batch dimension is > 1 stays whole; outputs are split back row-exactly. A failing
batch fails only its own requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from serving.errors import FermionError, InferenceFailed, InvalidInput, ModelNotReady, Overloaded

__all__ = ["BatchRunner", "BatcherStats", "DynamicBatcher"]

#: Computes one batch: named inputs with the batch in dim 0 -> named outputs.
BatchRunner = Callable[[dict[str, np.ndarray]], Awaitable[dict[str, np.ndarray]]]


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, n: int = 1) -> None:
        self.count += n
        self.ns += ns


@dataclass
class BatcherStats:
    """Counters in the shape of Triton's statistics extension."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute: _Duration = field(default_factory=_Duration)
    rejected: int = 0
    #: rows per batch -> (batches, compute ns)
    batch_sizes: dict[int, _Duration] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    shape_key: tuple[tuple[int, ...], ...]
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued_ns: int


class DynamicBatcher:
    """Gathers concurrent requests for one model version into batches.

    ``max_batch_size`` bounds the rows of a batch; ``max_queue_delay_s`` is how
    long a batch may wait for more rows while a runner slot is free (0: never);
    ``max_queue_size`` bounds waiting requests (503 above it);
    ``max_concurrent_batches`` is how many batches run at once.
    """

    def __init__(
        self,
        run_batch: BatchRunner,
        *,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        max_queue_size: int = 2048,
        max_concurrent_batches: int = 1,
        batched: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_size < 1 or max_concurrent_batches < 1 or max_queue_delay_s < 0:
            raise ValueError("max_queue_size and max_concurrent_batches must be >= 1, delay >= 0")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size if batched else 1
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.max_concurrent_batches = max_concurrent_batches
        self._batched = batched
        self._queue: deque[_Pending] = deque()
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.stats = BatcherStats()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Batches being computed now."""
        return self._running

    async def submit(self, inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """Queue one request of ``rows`` rows and wait for its outputs."""
        if self._closed:
            raise ModelNotReady("model version is unloading")
        if rows > self.max_batch_size:
            raise InvalidInput(
                f"batch of {rows} is over this model's max batch size {self.max_batch_size}"
            )
        if len(self._queue) >= self.max_queue_size:
            self.stats.rejected += 1
            raise Overloaded(f"queue full ({self.max_queue_size} waiting requests); retry later")
        loop = asyncio.get_running_loop()
        shape_key = tuple(a.shape[1:] for a in inputs.values()) if self._batched else ()
        pending = _Pending(inputs, rows, shape_key, loop.create_future(), time.perf_counter_ns())
        self._queue.append(pending)
        self._dispatch()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The client went away: never compute a request nobody waits for.
            with contextlib.suppress(ValueError):
                self._queue.remove(pending)
            raise

    def _dispatch(self) -> None:
        while self._queue and self._running < self.max_concurrent_batches:
            if self.max_queue_delay_s > 0 and not self._closed and self._should_wait():
                return
            batch = self._take_batch()
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _should_wait(self) -> bool:
        queued = sum(p.rows for p in self._queue)
        if queued >= self.max_batch_size:
            return False
        oldest = self._queue[0].enqueued_ns
        waited = (time.perf_counter_ns() - oldest) / 1e9
        if waited >= self.max_queue_delay_s:
            return False
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                self.max_queue_delay_s - waited, self._on_timer
            )
        return True

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _take_batch(self) -> list[_Pending]:
        head = self._queue.popleft()
        batch = [head]
        rows = head.rows
        if not self._batched:
            return batch
        keep: deque[_Pending] = deque()
        while self._queue and rows < self.max_batch_size:
            p = self._queue.popleft()
            if p.shape_key == head.shape_key and rows + p.rows <= self.max_batch_size:
                batch.append(p)
                rows += p.rows
            else:
                keep.append(p)
        keep.extend(self._queue)
        self._queue = keep
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        started = time.perf_counter_ns()
        rows = 0
        try:
            live = [p for p in batch if not p.future.done()]
            if not live:
                return
            rows = sum(p.rows for p in live)
            if len(live) == 1:
                inputs = live[0].inputs
            else:
                inputs = {
                    name: np.concatenate([p.inputs[name] for p in live]) for name in live[0].inputs
                }
            try:
                outputs = await self._run_batch(inputs)
                parts = self._split(outputs, live, rows)
            except Exception as e:
                error = (
                    e if isinstance(e, FermionError) else InferenceFailed(f"inference failed: {e}")
                )
                self._record(live, rows, started, ok=False)
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(error)
                return
            self._record(live, rows, started, ok=True)
            for p, out in zip(live, parts, strict=True):
                if not p.future.done():
                    p.future.set_result(out)
        finally:
            self._running -= 1
            self._dispatch()

    def _split(
        self, outputs: dict[str, np.ndarray], live: list[_Pending], rows: int
    ) -> list[dict[str, np.ndarray]]:
        if len(live) == 1:
            return [outputs]
        for name, arr in outputs.items():
            if arr.ndim == 0 or arr.shape[0] != rows:
                raise InferenceFailed(
                    f"model returned {name} with shape {list(arr.shape)} for a batch of {rows} rows"
                )
        parts: list[dict[str, np.ndarray]] = []
        offset = 0
        for p in live:
            end = offset + p.rows
            parts.append({name: arr[offset:end] for name, arr in outputs.items()})
            offset = end
        return parts

    def _record(self, live: list[_Pending], rows: int, started: int, *, ok: bool) -> None:
        now = time.perf_counter_ns()
        s = self.stats
        compute = now - started
        for p in live:
            s.queue.add(started - p.enqueued_ns)
            (s.success if ok else s.fail).add(now - p.enqueued_ns)
        if ok:
            s.inference_count += rows
            s.execution_count += 1
            s.compute.add(compute)
            s.batch_sizes.setdefault(rows, _Duration()).add(compute)
            s.last_inference_ms = int(time.time() * 1000)

    async def close(self) -> None:
        """Stop taking requests; finish every request already queued or running."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue or self._tasks:
            self._dispatch()
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
