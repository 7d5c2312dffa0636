"""Where each request of a version with a local replica and upstreams is computed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from serving.config import RemoteSettings
from serving.errors import InvalidInput, Overloaded
from serving.inference.batcher import DynamicBatcher
from serving.inference.placement import PlacedBatcher
from serving.inference.upstream.client import UpstreamUnavailable


class _Place:
    """A batch runner that doubles its input, after a delay, or fails as told."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.error: Exception | None = None
        self.rows = 0

    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        self.rows += len(inputs["x"])
        return {"y": inputs["x"] * 2}


def _placed(
    policy: str,
    local: _Place | None,
    remote: _Place,
    *,
    up: Callable[[], bool] = lambda: True,
    draw: Callable[[], float] = lambda: 0.0,
    local_batch: int = 8,
    remote_batch: int = 4,
    **settings: Any,
) -> PlacedBatcher:
    return PlacedBatcher(
        DynamicBatcher(local, max_batch_size=local_batch) if local is not None else None,
        DynamicBatcher(remote, max_batch_size=remote_batch, max_concurrent_batches=4),
        RemoteSettings(urls=["http://127.0.0.1:9"], policy=policy, **settings),  # type: ignore[arg-type]
        local_location="local",
        remote_up=up,
        draw=draw,
    )


def _x(v: float) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 2), v, dtype=np.float32)}


async def _locations(placed: PlacedBatcher, n: int) -> list[str]:
    answers = await asyncio.gather(*(placed.submit_located(_x(i), 1) for i in range(n)))
    for i, (outputs, _) in enumerate(answers):
        assert outputs["y"].tolist() == [[2.0 * i, 2.0 * i]]
    return [where for _, where in answers]


async def test_local_first_overflows_to_remote_only_past_the_queue_bound() -> None:
    local, remote = _Place(delay_s=0.05), _Place()
    placed = _placed("local-first", local, remote, overflow_queue_depth=3, local_batch=1)
    # One runs locally, 3 wait there (the bound), the other 6 go remote.
    locations = await _locations(placed, 10)
    assert locations == ["local"] * 4 + ["remote"] * 6
    assert placed.answers == {"local": 4, "remote": 6}
    # Idle again: local.
    assert await _locations(placed, 1) == ["local"]


async def test_local_first_keeps_requests_local_while_no_upstream_is_up() -> None:
    placed = _placed(
        "local-first", _Place(delay_s=0.02), _Place(), up=lambda: False, overflow_queue_depth=0
    )
    assert await _locations(placed, 5) == ["local"] * 5


async def test_remote_first_uses_the_local_replica_when_no_upstream_is_up() -> None:
    up = [True]
    placed = _placed("remote-first", _Place(), _Place(), up=lambda: up[0])
    assert await _locations(placed, 3) == ["remote"] * 3
    up[0] = False
    assert await _locations(placed, 3) == ["local"] * 3


async def test_split_sends_its_share_remote() -> None:
    draws = iter([0.1, 0.3, 0.29, 0.9, 0.0])
    placed = _placed("split", _Place(), _Place(), draw=lambda: next(draws), remote_percent=30)
    assert [await _locations(placed, 1) for _ in range(5)] == [
        ["remote"],
        ["local"],
        ["remote"],
        ["local"],
        ["remote"],
    ]


async def test_a_request_its_upstream_could_not_compute_is_computed_locally() -> None:
    local, remote = _Place(), _Place()
    remote.error = UpstreamUnavailable("no answer: cannot connect")
    placed = _placed("remote-first", local, remote)
    assert await _locations(placed, 4) == ["local"] * 4
    assert placed.answers == {"local": 4}


async def test_a_full_local_queue_moves_the_request_remote() -> None:
    local, remote = _Place(), _Place()
    local.error = Overloaded("queue full")
    placed = _placed("local-first", local, remote)
    assert await _locations(placed, 2) == ["remote"] * 2


@pytest.mark.parametrize("policy", ["local-first", "remote-first"])
async def test_a_model_error_is_not_retried_elsewhere(policy: str) -> None:
    local, remote = _Place(), _Place()
    local.error = remote.error = InvalidInput("bad value")
    placed = _placed(policy, local, remote)
    with pytest.raises(InvalidInput):
        await placed.submit_located(_x(1), 1)
    assert local.rows == remote.rows == 0


async def test_without_a_local_replica_every_request_goes_remote() -> None:
    remote = _Place()
    placed = _placed("local-first", None, remote)
    assert await _locations(placed, 3) == ["remote"] * 3
    remote.error = UpstreamUnavailable("no upstream up")
    with pytest.raises(UpstreamUnavailable):
        await placed.submit_located(_x(1), 1)


async def test_a_shadow_copy_is_computed_but_not_counted_as_an_answer() -> None:
    placed = _placed("remote-first", _Place(), _Place())
    outputs = await placed.submit(_x(3), 1)
    assert outputs["y"].tolist() == [[6.0, 6.0]]
    assert placed.answers == {}


async def test_a_request_must_fit_both_places() -> None:
    placed = _placed("local-first", _Place(), _Place(), local_batch=8, remote_batch=4)
    assert placed.max_batch_size == 4
    await placed.close()
