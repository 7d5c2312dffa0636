"""Admission: a place in the queue is taken before the body is read, and a queue that
cannot serve a request in time refuses it at once (the heads that cannot meet their own
deadlines are dropped first)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serving.errors import DeadlineExceeded, Overloaded
from serving.inference.batcher import DynamicBatcher


class _Held:
    """A model whose batches take ``delay_s``, or wait for ``release`` when it is unset."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.release = asyncio.Event()
        self.computed: list[float] = []

    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        else:
            await self.release.wait()
        self.computed.extend(inputs["x"][:, 0].tolist())
        return {"y": inputs["x"]}


def _x(value: float) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 2), value, np.float32)}


async def _settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


async def test_admitted_requests_hold_their_places_until_queued_or_released() -> None:
    model = _Held()
    batcher = DynamicBatcher(model, max_batch_size=1, max_queue_size=2)
    running = asyncio.ensure_future(batcher.submit(_x(0.0), 1))
    await _settle()
    batcher.admit()
    batcher.admit()  # two requests being read: the queue of 2 is full
    with pytest.raises(Overloaded, match=r"queue full \(2 waiting requests\)"):
        batcher.admit()
    with pytest.raises(Overloaded):
        await batcher.submit(_x(9.0), 1)  # nor may anyone jump ahead of them
    batcher.release()  # one was refused later (bad body, say)
    queued = asyncio.ensure_future(batcher.submit(_x(1.0), 1, admitted=True))
    await _settle()
    assert (batcher.admitted, batcher.queue_depth) == (0, 1)
    batcher.admit()
    model.release.set()
    await asyncio.gather(running, queued)
    batcher.release()
    assert model.computed == [0.0, 1.0] and batcher.stats.rejected == 2


async def _warmed(delay_s: float, max_queue_size: int = 2048) -> tuple[DynamicBatcher, _Held]:
    """A batcher that has timed one batch of ``delay_s``."""
    model = _Held(delay_s)
    batcher = DynamicBatcher(model, max_batch_size=1, max_queue_size=max_queue_size)
    await batcher.submit(_x(-1.0), 1)
    model.delay_s = 0.0  # from now on, batches wait for release
    model.computed.clear()
    return batcher, model


async def test_a_deadline_shorter_than_the_queued_work_is_refused_at_admission() -> None:
    batcher, model = await _warmed(0.05)
    running = asyncio.ensure_future(batcher.submit(_x(0.0), 1))
    queued = [asyncio.ensure_future(batcher.submit(_x(float(i)), 1)) for i in (1, 2, 3)]
    await _settle()
    now = time.perf_counter_ns()
    with pytest.raises(Overloaded, match="past this request's deadline") as refused:
        batcher.admit(deadline_ns=now + 20_000_000)  # 20 ms: about 4 batches of 50 ms queued
    assert refused.value.headers()["Retry-After"] == "1"
    batcher.admit(deadline_ns=now + 10_000_000_000)  # 10 s is plenty
    batcher.release()
    model.release.set()
    await asyncio.gather(running, *queued)


async def test_a_full_queue_drops_the_heads_that_cannot_meet_their_deadlines_first() -> None:
    batcher, model = await _warmed(0.05, max_queue_size=1)
    running = asyncio.ensure_future(batcher.submit(_x(0.0), 1))
    await _settle()
    # Due in 30 ms, but a batch takes 50 ms: it cannot be answered in time.
    doomed = asyncio.ensure_future(
        batcher.submit(_x(1.0), 1, deadline_ns=time.perf_counter_ns() + 30_000_000)
    )
    await _settle()
    assert batcher.queue_depth == 1
    batcher.admit()  # the queue is full, but its head is hopeless: it makes room
    with pytest.raises(DeadlineExceeded, match="deadline would pass"):
        await doomed
    admitted = asyncio.ensure_future(batcher.submit(_x(2.0), 1, admitted=True))
    model.release.set()
    await asyncio.gather(running, admitted)
    assert model.computed == [0.0, 2.0] and batcher.stats.expired == 1
