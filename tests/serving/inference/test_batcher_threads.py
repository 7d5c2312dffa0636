"""DynamicBatcher with a backend's own worker threads (``ThreadedRunner``): a worker
starts the next batch itself, and every guarantee of the loop's path still holds."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from serving.errors import DeadlineExceeded, InferenceFailed, InvalidInput, ModelNotReady
from serving.inference.batcher import DynamicBatcher, ThreadedRunner


class _ThreadModel:
    """Doubles its input on a real thread pool; records each batch's rows, its thread,
    when it started (perf_counter_ns) and how many batches ran at once."""

    def __init__(
        self,
        delay_s: float = 0.005,
        *,
        workers: int = 1,
        fail_marker: float | None = None,
        refuse_negative: bool = False,
    ) -> None:
        self.delay_s = delay_s
        self.fail_marker = fail_marker
        self.refuse_negative = refuse_negative
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="test-worker")
        self.batches: list[int] = []
        self.values: list[list[float]] = []
        self.started_ns: list[int] = []
        self.threads: set[str] = set()
        self.most_at_once = 0
        self._now = 0
        self._lock = threading.Lock()

    def runner(self) -> ThreadedRunner:
        def submit(job: Any) -> None:
            self.pool.submit(job)

        return ThreadedRunner(submit, self.run)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self._lock:
            self.started_ns.append(time.perf_counter_ns())
            self.batches.append(x.shape[0])
            self.values.append([float(v) for v in x[:, 0]])
            self.threads.add(threading.current_thread().name)
            self._now += 1
            self.most_at_once = max(self.most_at_once, self._now)
        try:
            time.sleep(self.delay_s)
            if self.refuse_negative and np.any(x < 0):
                raise InvalidInput("x must not be negative")
            if self.fail_marker is not None and np.any(x == self.fail_marker):
                raise RuntimeError("poisoned row in batch")
            return {"y": x * 2}
        finally:
            with self._lock:
                self._now -= 1

    async def unused(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise AssertionError("a threaded batcher computed through run_batch")


@pytest.fixture
def model() -> Iterator[_ThreadModel]:
    model = _ThreadModel()
    yield model
    model.pool.shutdown(wait=True)


def _batcher(threads: _ThreadModel, **kwargs: Any) -> DynamicBatcher:
    kwargs.setdefault("max_batch_size", 8)
    return DynamicBatcher(threads.unused, run_threaded=threads.runner(), **kwargs)


def _req(value: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 3), value, dtype=np.float32)}


async def _until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


async def test_a_worker_starts_the_next_batch_while_the_loop_is_busy(model: _ThreadModel) -> None:
    model.delay_s = 0.03
    batcher = _batcher(model)
    first = asyncio.ensure_future(batcher.submit(_req(0.0), 1))
    await _until(lambda: model.batches)  # the first batch computes
    rest = [asyncio.ensure_future(batcher.submit(_req(v), 1)) for v in (1.0, 2.0)]
    await asyncio.sleep(0)  # both queued behind it
    assert batcher.queue_depth == 2
    # The loop is busy (as with a burst of decodes) well past the first batch's end.
    time.sleep(0.15)
    unblocked = time.perf_counter_ns()
    results = await asyncio.gather(first, *rest)
    assert [float(r["y"][0, 0]) for r in results] == [0.0, 2.0, 4.0]
    assert model.batches == [1, 2]
    # The worker took the queued pair itself, while the loop could not have started it.
    assert model.started_ns[1] < unblocked
    assert batcher.stats.execution_count == 2 and batcher.stats.inference_count == 3
    assert batcher.running == 0


async def test_concurrent_requests_are_batched_and_routed_back(model: _ThreadModel) -> None:
    batcher = _batcher(model)
    values = [float(i) for i in range(60)]
    results = await asyncio.gather(
        *(batcher.submit(_req(v, 1 + i % 3), 1 + i % 3) for i, v in enumerate(values))
    )
    for i, (v, out) in enumerate(zip(values, results, strict=True)):
        np.testing.assert_array_equal(out["y"], np.full((1 + i % 3, 3), 2 * v, dtype=np.float32))
    assert all(b <= 8 for b in model.batches) and max(model.batches) > 1
    assert sum(model.batches) == sum(1 + i % 3 for i in range(60))
    assert batcher.stats.execution_count == len(model.batches)
    assert model.threads <= {"test-worker_0"}
    assert batcher.running == 0 and batcher.queue_depth == 0


async def test_concurrent_batches_stay_within_the_limit() -> None:
    model = _ThreadModel(delay_s=0.01, workers=4)
    try:
        batcher = _batcher(model, max_batch_size=2, max_concurrent_batches=2)
        await asyncio.gather(*(batcher.submit(_req(float(i)), 1) for i in range(30)))
        assert model.most_at_once == 2
        assert sum(model.batches) == 30 and batcher.running == 0
    finally:
        model.pool.shutdown(wait=True)


async def test_a_failing_batch_fails_only_its_requests() -> None:
    model = _ThreadModel(fail_marker=-1.0)
    try:
        batcher = _batcher(model, max_batch_size=4)
        values = [0.0, 1.0, 2.0, -1.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
        results = await asyncio.gather(
            *(batcher.submit(_req(v), 1) for v in values), return_exceptions=True
        )
        [poisoned] = [vs for vs in model.values if -1.0 in vs]
        for v, r in zip(values, results, strict=True):
            if v in poisoned:
                assert isinstance(r, InferenceFailed)
                assert r.message == "inference failed: poisoned row in batch"
            else:
                assert isinstance(r, dict) and float(r["y"][0, 0]) == 2 * v
        assert batcher.stats.failed_batches == 1
        assert batcher.stats.inference_count == len(values) - len(poisoned)
        assert float((await batcher.submit(_req(9.0), 1))["y"][0, 0]) == 18.0
    finally:
        model.pool.shutdown(wait=True)


async def test_a_batch_refused_for_one_request_answers_the_others() -> None:
    model = _ThreadModel(delay_s=0.01, refuse_negative=True)
    try:
        batcher = _batcher(model)
        first = asyncio.ensure_future(batcher.submit(_req(0.0), 1))
        await _until(lambda: model.batches)
        values = [1.0, -1.0, 2.0, 3.0]
        results = await asyncio.gather(
            *(batcher.submit(_req(v), 1) for v in values), return_exceptions=True
        )
        await first
        assert isinstance(results[1], InvalidInput)
        assert [float(r["y"][0, 0]) for r in results if isinstance(r, dict)] == [2.0, 4.0, 6.0]
        assert model.batches == [1, 4, 1, 1, 1, 1]  # refused together, then each alone
        assert batcher.stats.failed_batches == 1 and batcher.stats.inference_count == 4
    finally:
        model.pool.shutdown(wait=True)


async def test_a_deadline_that_passes_in_the_queue_is_never_computed(model: _ThreadModel) -> None:
    model.delay_s = 0.1
    batcher = _batcher(model)
    first = asyncio.ensure_future(batcher.submit(_req(0.0), 1))
    await _until(lambda: model.batches)
    late = asyncio.ensure_future(
        batcher.submit(_req(1.0), 1, deadline_ns=time.perf_counter_ns() + 20_000_000)
    )
    with pytest.raises(DeadlineExceeded) as raised:
        await late
    assert raised.value.message == "deadline passed while the request was queued"
    await first
    assert model.batches == [1] and batcher.stats.expired == 1


async def test_a_worker_drops_what_its_deadline_no_longer_allows(model: _ThreadModel) -> None:
    model.delay_s = 0.05
    batcher = _batcher(model)
    await batcher.submit(_req(-1.0), 1)  # the batcher learns a batch takes ~50 ms
    first = asyncio.ensure_future(batcher.submit(_req(0.0), 1))
    await _until(lambda: len(model.batches) == 2)
    soon = time.perf_counter_ns() + 60_000_000
    hopeless = asyncio.ensure_future(batcher.submit(_req(1.0), 1, deadline_ns=soon))
    patient = asyncio.ensure_future(batcher.submit(_req(2.0), 1))
    await asyncio.sleep(0)
    # The loop is blocked: the deadline's timer cannot run; the worker, taking the next
    # batch, sees that a ~50 ms batch cannot end before that deadline.
    time.sleep(0.2)
    await first
    assert float((await patient)["y"][0, 0]) == 4.0
    with pytest.raises(DeadlineExceeded) as raised:
        await hopeless
    assert raised.value.message == "deadline would pass before the request was computed"
    assert model.values[2] == [2.0] and batcher.stats.expired == 1


async def test_cancelled_requests_are_not_computed_and_the_others_are_answered(
    model: _ThreadModel,
) -> None:
    model.delay_s = 0.05
    batcher = _batcher(model)
    first = asyncio.ensure_future(batcher.submit(_req(0.0), 1))
    await _until(lambda: model.batches)
    gone = asyncio.ensure_future(batcher.submit(_req(1.0), 1))
    kept = asyncio.ensure_future(batcher.submit(_req(2.0), 1))
    await asyncio.sleep(0)
    gone.cancel()  # still queued: removed
    assert float((await kept)["y"][0, 0]) == 4.0
    await first
    assert model.values == [[0.0], [2.0]] and gone.cancelled()
    # Cancelled after a worker took it: never answered, its batch-mate is.
    third = asyncio.ensure_future(batcher.submit(_req(3.0), 1))
    await _until(lambda: len(model.batches) == 3)
    third.cancel()
    assert float((await batcher.submit(_req(4.0), 1))["y"][0, 0]) == 8.0
    assert third.cancelled()


async def test_a_higher_priority_is_taken_first_by_the_worker(model: _ThreadModel) -> None:
    model.delay_s = 0.03
    batcher = _batcher(model, max_batch_size=1, priority_levels=2)
    first = asyncio.ensure_future(batcher.submit(_req(0.0), 1))
    await _until(lambda: model.batches)
    low = asyncio.ensure_future(batcher.submit(_req(1.0), 1, priority=2))
    high = asyncio.ensure_future(batcher.submit(_req(2.0), 1, priority=1))
    await asyncio.gather(first, low, high)
    assert model.values == [[0.0], [2.0], [1.0]]


async def test_close_returns_once_every_queued_request_is_answered(model: _ThreadModel) -> None:
    model.delay_s = 0.01
    batcher = _batcher(model, max_batch_size=2)
    tasks = [asyncio.ensure_future(batcher.submit(_req(float(i)), 1)) for i in range(7)]
    await asyncio.sleep(0)
    await batcher.close()
    assert all(t.done() for t in tasks)
    assert [float(t.result()["y"][0, 0]) for t in tasks] == [2.0 * i for i in range(7)]
    assert batcher.running == 0
    with pytest.raises(ModelNotReady):
        await batcher.submit(_req(9.0), 1)


async def test_with_the_workers_gone_requests_fail_instead_of_hanging(
    model: _ThreadModel,
) -> None:
    batcher = _batcher(model)
    model.pool.shutdown(wait=True)
    with pytest.raises(ModelNotReady) as raised:
        await asyncio.wait_for(batcher.submit(_req(1.0), 1), timeout=5.0)
    assert raised.value.message.startswith("no worker: ")
    assert batcher.running == 0
    await asyncio.wait_for(batcher.close(), timeout=5.0)


async def test_a_queue_delay_still_gathers_rows_behind_a_running_batch(
    model: _ThreadModel,
) -> None:
    model.delay_s = 0.1
    batcher = _batcher(model, max_queue_delay_s=0.2)

    async def later(v: float, wait: float) -> dict[str, np.ndarray]:
        await asyncio.sleep(wait)
        return await batcher.submit(_req(v), 1)

    # 0 and 1 gather for 200 ms, then compute until about 300 ms. 2 comes in meanwhile:
    # the worker, done, leaves it to its own window (until about 440 ms), which 3 joins.
    await asyncio.gather(later(0.0, 0), later(1.0, 0.04), later(2.0, 0.24), later(3.0, 0.34))
    assert model.values == [[0.0, 1.0], [2.0, 3.0]]
