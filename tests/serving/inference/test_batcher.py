"""DynamicBatcher: real batching under concurrency, exact splits, isolated failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from serving.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    ModelNotReady,
    Overloaded,
)
from serving.inference.batcher import DynamicBatcher, ThreadedRunner, batch_deadline_ns
from serving.observability import tracing
from serving.observability.counters import VersionCounter


class _DoubleModel:
    """Doubles its input; records the rows of every batch it computes."""

    def __init__(self, delay_s: float = 0.005, fail_marker: float | None = None) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s
        self.fail_marker = fail_marker

    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.batches.append(x.shape[0])
        await asyncio.sleep(self.delay_s)
        return self._double(x)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The same on the calling thread (a worker's)."""
        x = inputs["x"]
        self.batches.append(x.shape[0])
        time.sleep(self.delay_s)
        return self._double(x)

    def _double(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.fail_marker is not None and np.any(x == self.fail_marker):
            raise RuntimeError("poisoned row in batch")
        return {"y": x * 2}


def _req(value: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 3), value, dtype=np.float32)}


async def test_idle_request_is_dispatched_at_once() -> None:
    model = _DoubleModel(delay_s=0)
    batcher = DynamicBatcher(model, max_batch_size=8)
    out = await batcher.submit(_req(1.0), 1)
    assert model.batches == [1]
    np.testing.assert_array_equal(out["y"], np.full((1, 3), 2.0, dtype=np.float32))


async def test_concurrent_requests_are_batched_and_routed_back() -> None:
    model = _DoubleModel()
    batcher = DynamicBatcher(model, max_batch_size=16)
    values = [float(i) for i in range(40)]
    results = await asyncio.gather(*(batcher.submit(_req(v), 1) for v in values))
    for v, out in zip(values, results, strict=True):
        np.testing.assert_array_equal(out["y"], np.full((1, 3), 2 * v, dtype=np.float32))
    assert max(model.batches) > 1
    assert all(b <= 16 for b in model.batches)
    assert sum(model.batches) == 40
    assert batcher.stats.inference_count == 40
    assert batcher.stats.execution_count == len(model.batches)


async def test_multi_row_requests_stay_whole() -> None:
    model = _DoubleModel()
    batcher = DynamicBatcher(model, max_batch_size=8)
    sizes = [3, 5, 2, 8, 1, 4]
    results = await asyncio.gather(
        *(batcher.submit(_req(float(i), n), n) for i, n in enumerate(sizes))
    )
    for i, (n, out) in enumerate(zip(sizes, results, strict=True)):
        assert out["y"].shape == (n, 3)
        np.testing.assert_array_equal(out["y"], np.full((n, 3), 2.0 * i, dtype=np.float32))
    assert all(b <= 8 for b in model.batches)


async def test_batch_over_limit_is_rejected() -> None:
    batcher = DynamicBatcher(_DoubleModel(), max_batch_size=4)
    with pytest.raises(InvalidInput, match="max batch size 4"):
        await batcher.submit(_req(1.0, 5), 5)


async def test_failing_batch_fails_only_its_requests() -> None:
    model = _DoubleModel(fail_marker=-1.0)
    batcher = DynamicBatcher(model, max_batch_size=4)
    # The first request runs alone; the next ones gather behind it in batches of <= 4.
    values = [0.0, 1.0, 2.0, -1.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    results = await asyncio.gather(
        *(batcher.submit(_req(v), 1) for v in values), return_exceptions=True
    )
    failed = [v for v, r in zip(values, results, strict=True) if isinstance(r, Exception)]
    assert -1.0 in failed
    assert all(isinstance(r, InferenceFailed) for r in results if isinstance(r, Exception))
    # Requests in other batches succeeded with the right values.
    ok = [(v, r) for v, r in zip(values, results, strict=True) if not isinstance(r, Exception)]
    assert ok, "requests outside the poisoned batch must succeed"
    assert len(failed) <= 4
    for v, r in ok:
        assert isinstance(r, dict)
        np.testing.assert_array_equal(r["y"], np.full((1, 3), 2 * v, dtype=np.float32))
    # Statistics count the failed batch as failed, and only answered rows as inferences.
    assert batcher.stats.failed_batches == 1
    assert batcher.stats.inference_count == len(ok)
    assert batcher.stats.execution_count == len(model.batches) - 1
    # And the batcher keeps serving.
    out = await batcher.submit(_req(9.0), 1)
    assert out["y"][0, 0] == 18.0


class _RefusingModel(_DoubleModel):
    """Refuses any batch holding a negative value, as an upstream's input check does."""

    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if np.any(inputs["x"] < 0):
            self.batches.append(inputs["x"].shape[0])
            raise InvalidInput("x must not be negative")
        return await super().__call__(inputs)


async def test_a_batch_refused_for_one_request_answers_the_others() -> None:
    model = _RefusingModel(delay_s=0.01)
    batcher = DynamicBatcher(model, max_batch_size=8)
    values = [0.0, 1.0, -1.0, 2.0, 3.0]
    results = await asyncio.gather(
        *(batcher.submit(_req(v), 1) for v in values), return_exceptions=True
    )
    refused = [v for v, r in zip(values, results, strict=True) if isinstance(r, InvalidInput)]
    assert refused == [-1.0]
    for v, r in zip(values, results, strict=True):
        if v >= 0:
            assert isinstance(r, dict)
            np.testing.assert_array_equal(r["y"], np.full((1, 3), 2 * v, dtype=np.float32))
    # The first ran alone, the next four together (refused), then each of them alone.
    assert model.batches == [1, 4, 1, 1, 1, 1]
    assert batcher.stats.inference_count == 4
    assert batcher.stats.failed_batches == 1


class _HeldModel:
    """Returns its input once ``release`` is set; counts the batches it started."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.started += 1
        await self.release.wait()
        return {"y": inputs["x"]}


@pytest.mark.parametrize(("queue_size", "concurrent"), [(1, 1), (3, 1), (2, 2)])
async def test_queue_bound_admits_exactly_the_queue_size_beyond_the_running_batches(
    queue_size: int, concurrent: int
) -> None:
    model = _HeldModel()
    batcher = DynamicBatcher(
        model, max_batch_size=1, max_queue_size=queue_size, max_concurrent_batches=concurrent
    )
    running = [asyncio.ensure_future(batcher.submit(_req(-1.0), 1)) for _ in range(concurrent)]
    for _ in range(100):  # until the batch tasks have started
        await asyncio.sleep(0)
    assert (model.started, batcher.running, batcher.queue_depth) == (concurrent, concurrent, 0)
    waiting = [asyncio.ensure_future(batcher.submit(_req(float(i)), 1)) for i in range(queue_size)]
    for _ in range(100):
        await asyncio.sleep(0)
    assert batcher.queue_depth == queue_size and not any(t.done() for t in waiting)
    for _ in range(2):
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(_req(99.0), 1)
        assert refused.value.message == (f"queue full ({queue_size} waiting requests); retry later")
    assert batcher.stats.rejected == 2
    model.release.set()
    results = await asyncio.gather(*running, *waiting)
    assert [float(r["y"][0, 0]) for r in results[concurrent:]] == list(
        map(float, range(queue_size))
    )
    assert model.started == concurrent + queue_size
    # Room again once the queue drained.
    assert float((await batcher.submit(_req(7.0), 1))["y"][0, 0]) == 7.0


async def test_incompatible_shapes_are_not_mixed() -> None:
    seen: list[tuple[int, ...]] = []

    async def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(inputs["x"].shape)
        await asyncio.sleep(0.002)
        return {"y": inputs["x"].sum(axis=1)}

    batcher = DynamicBatcher(run, max_batch_size=16)
    reqs = [np.ones((1, 2 + i % 3), dtype=np.float32) for i in range(12)]
    results = await asyncio.gather(*(batcher.submit({"x": r}, 1) for r in reqs))
    for r, out in zip(reqs, results, strict=True):
        assert out["y"][0] == r.shape[1]


async def test_cancelled_request_is_not_computed() -> None:
    model = _DoubleModel(delay_s=0.05)
    batcher = DynamicBatcher(model, max_batch_size=1)
    first = asyncio.ensure_future(batcher.submit(_req(1.0), 1))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(batcher.submit(_req(2.0), 1))
    await asyncio.sleep(0.001)
    second.cancel()
    await first
    await asyncio.sleep(0.07)
    assert model.batches == [1]


async def test_queue_delay_gathers_a_batch_when_idle() -> None:
    model = _DoubleModel(delay_s=0)
    batcher = DynamicBatcher(model, max_batch_size=8, max_queue_delay_s=0.5)

    async def later(v: float, wait: float) -> dict[str, np.ndarray]:
        await asyncio.sleep(wait)
        return await batcher.submit(_req(v), 1)

    await asyncio.gather(later(1.0, 0), later(2.0, 0.01), later(3.0, 0.02))
    assert model.batches == [3]


async def test_close_finishes_queued_requests() -> None:
    model = _DoubleModel(delay_s=0.01)
    batcher = DynamicBatcher(model, max_batch_size=2)
    tasks = [asyncio.ensure_future(batcher.submit(_req(float(i)), 1)) for i in range(7)]
    await asyncio.sleep(0)
    await batcher.close()
    assert all(t.done() for t in tasks)  # close returns once every one is answered
    results = await asyncio.gather(*tasks)
    assert [r["y"][0, 0] for r in results] == [2.0 * i for i in range(7)]
    with pytest.raises(ModelNotReady) as refused:
        await batcher.submit(_req(9.0), 1)
    assert refused.value.message == "model version is unloading"
    assert model.batches == [1, 2, 2, 2]


async def test_a_running_batch_exposes_its_requests_last_deadline() -> None:
    seen: list[int | None] = []

    async def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(batch_deadline_ns.get())
        await asyncio.sleep(0.02)
        return {"y": inputs["x"]}

    batcher = DynamicBatcher(run, max_batch_size=8)
    now = time.perf_counter_ns()
    soon, later = now + 5_000_000_000, now + 9_000_000_000
    first = asyncio.ensure_future(batcher.submit(_req(0.0), 1, deadline_ns=soon))
    await asyncio.sleep(0.005)  # the first batch runs alone; these two share the next
    await asyncio.gather(
        batcher.submit(_req(1.0), 1, deadline_ns=soon),
        batcher.submit(_req(2.0), 1, deadline_ns=later),
        first,
    )
    await asyncio.gather(
        batcher.submit(_req(3.0), 1, deadline_ns=soon), batcher.submit(_req(4.0), 1)
    )
    assert seen[0] == soon
    assert seen[1] == later
    assert seen[-1] is None  # a request without a deadline waits for the batch however long
    assert batch_deadline_ns.get() is None  # set only inside the batch's own task


async def test_a_full_batch_does_not_wait_for_the_queue_delay() -> None:
    model = _DoubleModel(delay_s=0)
    batcher = DynamicBatcher(model, max_batch_size=2, max_queue_delay_s=60.0)
    both = asyncio.gather(batcher.submit(_req(1.0), 1), batcher.submit(_req(2.0), 1))
    # Dispatched as soon as the batch is full: long before the minute of delay is over.
    await asyncio.wait_for(both, timeout=10.0)
    assert model.batches == [2]


async def test_each_gathering_window_ends_after_the_queue_delay() -> None:
    model = _DoubleModel(delay_s=0)
    batcher = DynamicBatcher(model, max_batch_size=8, max_queue_delay_s=0.02)
    for value in (1.0, 2.0, 3.0):  # each alone: its own window, its own timer
        out = await asyncio.wait_for(batcher.submit(_req(value), 1), timeout=10.0)
        assert float(out["y"][0, 0]) == 2 * value
    assert model.batches == [1, 1, 1]


async def test_a_gateway_error_from_the_model_reaches_the_client_as_it_is() -> None:
    # A typed error (say, the replica is gone: 503) is not turned into a 500.
    gone = ModelNotReady("replica gone")

    async def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise gone

    batcher = DynamicBatcher(run, max_batch_size=4)
    with pytest.raises(ModelNotReady) as raised:
        await batcher.submit(_req(1.0), 1)
    assert raised.value is gone


async def test_outputs_without_a_row_per_request_fail_the_batch_saying_so() -> None:
    async def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        await asyncio.sleep(0.01)
        return {"y": inputs["x"][:1]}  # one row, whatever the batch

    batcher = DynamicBatcher(run, max_batch_size=4)
    first = asyncio.ensure_future(batcher.submit(_req(0.0), 1))
    await asyncio.sleep(0)
    pair = [asyncio.ensure_future(batcher.submit(_req(v), 1)) for v in (1.0, 2.0)]
    assert float((await first)["y"][0, 0]) == 0.0  # alone: one row is right
    for task in pair:
        with pytest.raises(InferenceFailed) as raised:
            await task
        assert raised.value.message == "model returned y with shape [1, 3] for a batch of 2 rows"


async def test_a_request_cancelled_after_its_batch_was_taken_leaves_the_others_answered() -> None:
    model = _DoubleModel(delay_s=0.02)
    batcher = DynamicBatcher(model, max_batch_size=8)
    a: asyncio.Future[dict[str, np.ndarray]] | None = None

    async def first() -> None:
        await batcher.submit(_req(0.0), 1)
        # The next batch (a and b) was taken as this one ended; a's client goes away now,
        # before that batch runs.
        assert a is not None
        a.cancel()

    runner = asyncio.ensure_future(first())
    await asyncio.sleep(0)
    a = asyncio.ensure_future(batcher.submit(_req(1.0), 1))
    b = asyncio.ensure_future(batcher.submit(_req(2.0), 1))
    out = await asyncio.wait_for(b, timeout=10.0)
    assert float(out["y"][0, 0]) == 4.0
    await runner
    assert a.cancelled()
    assert model.batches == [1, 1]  # a was never computed


class _UnprintableInputs(dict[str, np.ndarray]):
    """Inputs whose repr fails: printing a request's tensors is never on a request's path
    (the repr of a 28x28 image costs about 3 ms of the event loop)."""

    def __repr__(self) -> str:
        raise AssertionError("a request's tensors were formatted")


async def test_a_taken_request_cancelled_or_expired_is_not_formatted() -> None:
    model = _DoubleModel(delay_s=0.05)
    batcher = DynamicBatcher(model, max_batch_size=8)
    inputs = _UnprintableInputs(x=np.ones((1, 3), dtype=np.float32))
    taken = asyncio.ensure_future(batcher.submit(inputs, 1))
    await asyncio.sleep(0.01)  # its batch is running
    taken.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taken
    # A deadline that passes while its batch runs (the first batch: nothing learned yet).
    slow = DynamicBatcher(_DoubleModel(delay_s=0.1), max_batch_size=8)
    inputs = _UnprintableInputs(x=np.ones((1, 3), dtype=np.float32))
    out = await slow.submit(inputs, 1, deadline_ns=time.perf_counter_ns() + 30_000_000)
    assert out["y"].shape == (1, 3)
    assert slow.stats.expired == 0


class _BlockingModel:
    """Blocks the event loop while it computes (as a synchronous executor would)."""

    def __init__(self, block_s: float) -> None:
        self.block_s = block_s
        self.rows: list[float] = []

    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.rows.extend(float(v) for v in inputs["x"][:, 0])
        time.sleep(self.block_s)
        return {"y": inputs["x"]}


async def test_a_request_whose_deadline_passed_as_its_batch_was_taken_is_dropped_alone() -> None:
    model = _BlockingModel(block_s=0.05)
    batcher = DynamicBatcher(model, max_batch_size=8)
    first = asyncio.ensure_future(batcher.submit(_req(0.0), 1))
    soon = time.perf_counter_ns() + 1_000_000
    late = asyncio.ensure_future(batcher.submit(_req(1.0), 1, deadline_ns=soon))
    patient = asyncio.ensure_future(batcher.submit(_req(2.0), 1))
    # The loop is blocked past ``soon`` while the first batch computes: the next batch is
    # taken before the deadline's timer can run, and the late request is dropped as the
    # batch is formed (its deadline cannot be met), not computed.
    await first
    out = await asyncio.wait_for(patient, timeout=10.0)
    assert float(out["y"][0, 0]) == 2.0
    with pytest.raises(DeadlineExceeded) as raised:
        await late
    assert raised.value.message == "deadline would pass before the request was computed"
    assert model.rows == [0.0, 2.0] and batcher.stats.expired == 1


async def test_a_sooner_deadline_queued_behind_a_later_one_expires_on_time() -> None:
    # One timer watches the queue's deadlines: a request arriving with a sooner deadline
    # than every queued one must move it, and each expiry re-arms it for the next.
    model = _DoubleModel(delay_s=0.4)
    batcher = DynamicBatcher(model, max_batch_size=1, priority_levels=2)
    busy = asyncio.ensure_future(batcher.submit(_req(0.0), 1))
    await asyncio.sleep(0.01)  # the runner is taken: the rest wait in the queue
    now = time.perf_counter_ns()
    patient = asyncio.ensure_future(batcher.submit(_req(1.0), 1, deadline_ns=now + 10**10))
    hurried = asyncio.ensure_future(
        batcher.submit(_req(2.0), 1, deadline_ns=now + 30_000_000, priority=2)
    )
    middling = asyncio.ensure_future(batcher.submit(_req(3.0), 1, deadline_ns=now + 90_000_000))
    unbounded = asyncio.ensure_future(batcher.submit(_req(4.0), 1))
    await asyncio.sleep(0)
    assert batcher.queue_depth == 4
    for task, by_ms in ((hurried, 30), (middling, 90)):
        with pytest.raises(DeadlineExceeded) as raised:
            await asyncio.wait_for(task, 1.0)
        assert raised.value.message == "deadline passed while the request was queued"
        assert (time.perf_counter_ns() - now) / 1e6 < by_ms + 200  # not at the 10 s one
    assert batcher.stats.expired == 2 and batcher.queue_depth == 2
    assert not patient.done() and not unbounded.done()
    assert (await busy)["y"][0, 0] == 0.0
    assert (await patient)["y"][0, 0] == 2.0
    assert (await unbounded)["y"][0, 0] == 8.0
    assert model.batches == [1, 1, 1]
    await batcher.close()


async def test_a_lower_priority_request_fills_the_batch_behind_a_higher_one() -> None:
    model = _DoubleModel(delay_s=0.02)
    batcher = DynamicBatcher(model, max_batch_size=8, priority_levels=3)
    first = asyncio.ensure_future(batcher.submit(_req(0.0), 1))
    await asyncio.sleep(0)
    rest = [
        asyncio.ensure_future(batcher.submit(_req(v), 1, priority=p)) for v, p in [(1, 1), (3, 3)]
    ]
    await asyncio.gather(first, *rest)
    assert model.batches == [1, 2]  # level 2 is empty: level 3 still joins level 1's batch


@pytest.mark.parametrize("on_workers", [False, True], ids=["loop", "worker-threads"])
async def test_a_batch_is_a_span_under_its_first_request_linked_to_all(
    exporter: InMemorySpanExporter, on_workers: bool
) -> None:
    model = _DoubleModel(delay_s=0.02, fail_marker=-1.0)
    pool = ThreadPoolExecutor(max_workers=1)

    def submit(job: Callable[[], None]) -> None:
        pool.submit(job)

    batcher = DynamicBatcher(
        model,
        max_batch_size=8,
        model="m",
        version="3",
        run_threaded=ThreadedRunner(submit, model.run) if on_workers else None,
    )
    tracer = tracing.current_tracer()
    assert tracer is not None

    async def traced(name: str, value: float) -> Any:
        with tracer.start_as_current_span(name):
            return await batcher.submit(_req(value), 1)

    first = asyncio.ensure_future(traced("r0", 0.0))
    await asyncio.sleep(0)
    await asyncio.gather(first, traced("r1", 1.0), traced("r2", 2.0))
    await asyncio.gather(traced("r3", -1.0), return_exceptions=True)  # a failing batch
    spans = {s.name: s for s in exporter.get_finished_spans() if s.name.startswith("r")}
    batches = [s for s in exporter.get_finished_spans() if s.name == "fermion.batch"]
    runs = [s for s in exporter.get_finished_spans() if s.name == "fermion.execute"]
    assert len(batches) == len(runs) == 3
    queued = [s for s in exporter.get_finished_spans() if s.name == "fermion.queue"]
    assert len(queued) == 4
    assert all(
        dict(q.attributes or {}) == {"fermion.model": "m", "fermion.version": "3"} for q in queued
    )
    shared = next(b for b in batches if b.attributes and b.attributes["fermion.batch.rows"] == 2)
    assert dict(shared.attributes or {}) == {
        "fermion.model": "m",
        "fermion.version": "3",
        "fermion.batch.rows": 2,
        "fermion.batch.requests": 2,
    }
    assert shared.parent is not None and shared.parent.span_id == spans["r1"].context.span_id
    linked = {link.context.span_id for link in shared.links}
    assert linked == {spans["r1"].context.span_id, spans["r2"].context.span_id}
    for batch in batches:  # each run span sits under its batch, inside it
        [run] = [r for r in runs if r.parent and r.parent.span_id == batch.context.span_id]
        assert (batch.start_time or 0) <= (run.start_time or 0)
        assert (run.end_time or 0) <= (batch.end_time or 0)
    r3 = spans["r3"].context.span_id
    failed = next(b for b in batches if b.parent and b.parent.span_id == r3)
    assert [e.name for e in failed.events] == ["exception"]
    recorded = failed.events[0].attributes or {}
    assert recorded.get("exception.message") == "poisoned row in batch"
    pool.shutdown(wait=True)


@pytest.mark.parametrize(
    "bad",
    [{"max_queue_size": 0}, {"max_concurrent_batches": 0}, {"max_queue_delay_s": -0.1}],
)
def test_bad_settings_are_refused_one_by_one(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as raised:
        DynamicBatcher(_DoubleModel(), max_batch_size=4, **bad)
    assert str(raised.value) == (
        "max_queue_size and max_concurrent_batches must be >= 1, delay >= 0"
    )


async def test_the_counter_given_is_the_one_kept_else_one_named_after_the_version() -> None:
    counter = VersionCounter("m", 3)
    batcher = DynamicBatcher(_DoubleModel(delay_s=0), max_batch_size=4, stats=counter)
    await batcher.submit(_req(1.0), 1)
    assert batcher.stats is counter and counter.inference_count == 1
    named = DynamicBatcher(_DoubleModel(), max_batch_size=4, model="m", version="7")
    assert (named.stats.model, named.stats.version) == ("m", 7)
    unnamed = DynamicBatcher(_DoubleModel(), max_batch_size=4, version="latest")
    assert (unnamed.stats.model, unnamed.stats.version) == ("", 0)
    assert unnamed.max_queue_size == 2048


async def test_an_unbatched_model_computes_each_request_alone() -> None:
    model = _DoubleModel()
    batcher = DynamicBatcher(model, max_batch_size=8, batched=False)
    assert batcher.max_batch_size == 1  # what the inference service checks requests against
    await asyncio.gather(*(batcher.submit(_req(float(v)), 1) for v in range(4)))
    assert model.batches == [1, 1, 1, 1]


async def test_a_deadline_already_passed_is_refused_before_queueing() -> None:
    model = _DoubleModel()
    batcher = DynamicBatcher(model, max_batch_size=4)
    for _ in range(2):
        with pytest.raises(DeadlineExceeded) as raised:
            await batcher.submit(_req(1.0), 1, deadline_ns=time.perf_counter_ns() - 1)
        assert raised.value.message == "deadline passed before the request was queued"
    assert batcher.stats.expired == 2 and model.batches == []


class _InlineDouble:
    """An inline runner doubling its input, which can decline or fail on demand."""

    def __init__(self) -> None:
        self.calls = 0
        self.decline = False
        self.fail = False

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        if self.decline:
            return None
        self.calls += 1
        if self.fail:
            raise RuntimeError("inline run failed")
        return {"y": inputs["x"] * 2}


async def test_one_request_at_a_time_runs_inline_after_a_streak() -> None:
    model = _DoubleModel(delay_s=0)
    inline = _InlineDouble()
    batcher = DynamicBatcher(model, max_batch_size=8, run_inline=inline)
    for i in range(20):
        out = await batcher.submit(_req(float(i)), 1)
        assert float(out["y"][0, 0]) == 2.0 * i
    # The first 8 lone batches went to the backend; then each ran inline.
    assert (len(model.batches), inline.calls) == (8, 12)


async def test_concurrent_traffic_never_runs_inline_and_resets_the_streak() -> None:
    model = _DoubleModel(delay_s=0.005)
    inline = _InlineDouble()
    batcher = DynamicBatcher(model, max_batch_size=8, run_inline=inline)
    for i in range(12):
        await batcher.submit(_req(float(i)), 1)
    calls = inline.calls
    assert calls > 0
    results = await asyncio.gather(*(batcher.submit(_req(float(v)), 1) for v in range(30)))
    assert [float(r["y"][0, 0]) for r in results] == [2.0 * v for v in range(30)]
    # The burst's first request found the others decoding or queued behind it: no inline.
    assert inline.calls in (calls, calls + 1)
    before = len(model.batches)
    await batcher.submit(_req(1.0), 1)
    assert len(model.batches) == before + 1  # the streak starts again


async def test_an_inline_runner_that_declines_leaves_the_batch_to_the_backend() -> None:
    model = _DoubleModel(delay_s=0)
    inline = _InlineDouble()
    inline.decline = True
    batcher = DynamicBatcher(model, max_batch_size=8, run_inline=inline)
    for i in range(15):
        out = await batcher.submit(_req(float(i)), 1)
        assert float(out["y"][0, 0]) == 2.0 * i
    assert (len(model.batches), inline.calls) == (15, 0)


async def test_an_inline_failure_fails_its_request_only() -> None:
    inline = _InlineDouble()
    batcher = DynamicBatcher(_DoubleModel(delay_s=0), max_batch_size=8, run_inline=inline)
    for i in range(10):
        await batcher.submit(_req(float(i)), 1)
    inline.fail = True
    with pytest.raises(InferenceFailed, match="inline run failed"):
        await batcher.submit(_req(1.0), 1)
    inline.fail = False
    out = await batcher.submit(_req(3.0), 1)
    assert float(out["y"][0, 0]) == 6.0
    assert batcher.stats.failed_batches == 1
