"""The Redis control store against a real redis-server: fencing, locks, buckets, seeding."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from serving.config import ControlConfig, RateLimitRule
from serving.control.store import (
    ControlStore,
    RouteSnapshot,
    StoreConflict,
    StoreUnavailable,
    create_store,
)
from serving.inference.fleet_limits import FleetRateLimiter
from tests.helpers.redis_server import RedisServer

_PREFIXES = iter(range(1_000_000))


@pytest_asyncio.fixture
async def store(redis: RedisServer) -> AsyncIterator[ControlStore]:
    config = ControlConfig(store=redis.url, key_prefix=f"t{next(_PREFIXES)}", timeout_s=0.3)
    made = create_store(config)
    assert made is not None
    await made.start()
    yield made
    await made.close()


async def test_an_old_driver_is_fenced_out_once_its_lease_is_taken(store: ControlStore) -> None:
    await store.create_rollout("clf", '{"status": "running"}')
    with pytest.raises(StoreConflict):
        await store.create_rollout("clf", '{"status": "running"}')
    old = await store.acquire_lease("clf", "gw-a", 5.0)
    assert old is not None and old.startswith("gw-a|")
    assert await store.acquire_lease("clf", "gw-b", 5.0) is None  # held
    new = await store.acquire_lease("clf", "gw-b", 5.0, force=True)
    assert new is not None and new != old
    assert not await store.save_rollout("clf", '{"status": "running", "x": 1}', fence=old)
    with pytest.raises(StoreConflict):
        await store.set_route("clf", '{"split": {"1": 1}}', fence=old)
    assert not await store.renew_lease("clf", old, 5.0)
    assert await store.save_rollout("clf", '{"status": "running", "x": 2}', fence=new)
    assert (await store.rollouts())["clf"] == '{"status": "running", "x": 2}'


async def test_a_route_is_locked_by_hand_while_its_rollout_runs(store: ControlStore) -> None:
    v1 = await store.set_route("clf", '{"split": {"1": 1}}', fence=None)
    await store.create_rollout("clf", '{"status": "running"}')
    with pytest.raises(StoreConflict, match="running"):
        await store.set_route("clf", '{"split": {"2": 1}}', fence=None)
    fence = await store.acquire_lease("clf", "gw", 5.0)
    assert fence is not None
    assert await store.save_rollout("clf", '{"status": "promoted"}', fence=fence)
    v2 = await store.set_route("clf", '{"split": {"2": 1}}', fence=None)
    assert v2 == v1 + 1
    snapshot = await store.routes()
    assert snapshot == RouteSnapshot(v2, {"clf": '{"split": {"2": 1}}'})


async def test_seeding_writes_only_an_empty_table(store: ControlStore) -> None:
    assert await store.route_version() is None
    assert await store.seed_routes(RouteSnapshot(7, {"clf": "{}"}))
    assert not await store.seed_routes(RouteSnapshot(9, {"other": "{}"}))
    assert await store.routes() == RouteSnapshot(7, {"clf": "{}"})


async def test_a_bucket_gives_its_burst_then_its_rate(store: ControlStore) -> None:
    taken, wait = await store.take_tokens("b", 10.0, 5, 3)
    assert (taken, wait) == (3, 0.0)
    taken, wait = await store.take_tokens("b", 10.0, 5, 3)
    assert taken == 2 and 0.0 < wait <= 0.1
    await store.give_tokens("b", 10.0, 5, 2)
    assert (await store.take_tokens("b", 10.0, 5, 5))[0] >= 2


async def test_two_gateways_share_one_bucket_through_leases(store: ControlStore) -> None:
    rule = [RateLimitRule(rate=20.0, burst=10)]
    a, b = FleetRateLimiter(rule, store), FleetRateLimiter(rule, store)
    admitted = 0
    start = time.monotonic()
    while time.monotonic() - start < 1.0:
        for limiter in (a, b):
            if await limiter.admit("ci", "m") == 0.0:
                admitted += 1
        await a.give_back()
        await b.give_back()
    # One bucket: 10 + 20/s over a second, whichever gateway asked (tokens left in leases
    # at the end are not admitted).
    elapsed = time.monotonic() - start
    assert admitted <= 10 + 20 * elapsed + 1
    assert admitted >= 10 + 20 * elapsed - 2 * 2 - 1  # 2 leases of ceil(20 x 0.1) tokens


async def test_a_store_that_is_down_says_so(tmp_path: Path) -> None:
    config = ControlConfig(store="redis://127.0.0.1:1/0", timeout_s=0.2)
    made = create_store(config)
    assert made is not None
    await made.start()
    assert not made.up
    limiter = FleetRateLimiter([RateLimitRule(rate=1.0, burst=2)], made, live=lambda: 2)
    # Local buckets at rate / 2 live gateways: burst 2 // 2 = 1.
    assert await limiter.admit("ci", "m") == 0.0
    assert await limiter.admit("ci", "m") > 0.0
    await made.close()


async def test_a_call_cancelled_mid_command_stays_cancelled(store: ControlStore) -> None:
    # The fleet sync's loop shape: calls in a loop that rides out StoreUnavailable. Cancelled
    # at many moments (mid-write, mid-read, between calls), it must end every time: redis-py
    # under Python 3.11 returned from a command cancelled as its write completed, and the
    # loop ran on, so the gateway's shutdown waited for it forever.
    rng = random.Random(7)

    async def sync_loop() -> None:
        while True:
            with contextlib.suppress(StoreUnavailable):
                await store.route_version()
                await store.heartbeat("gw", {"pid": 1}, 1.0)
            await asyncio.sleep(0)

    for _ in range(150):
        task = asyncio.create_task(sync_loop())
        await asyncio.sleep(rng.random() * 0.004)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2.0)
        assert done, "the cancelled loop ran on: a cancellation was swallowed"
        assert task.cancelled()
    assert await store.route_version() is None  # the store still answers afterwards
