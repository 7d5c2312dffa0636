"""Limits: rate limits (429 + Retry-After), request size (400), deadlines (504), priorities."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio

from model_store.store import ModelStore
from serving.config import FermionConfig, LimitsConfig, RateLimitRule
from serving.errors import DeadlineExceeded, InvalidInput, RateLimited
from serving.inference.batcher import DynamicBatcher
from serving.inference.limits import RateLimiter, RequestLimits, caller_key
from tests.helpers.inprocess import InProcessGateway, digits_body, serve_in_process


class _Recorder:
    """Returns its input; records the first value of every row it computes, in order."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.rows: list[float] = []
        self.delay_s = delay_s

    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.rows.extend(float(v) for v in inputs["x"][:, 0])
        await asyncio.sleep(self.delay_s)
        return {"y": inputs["x"]}


def _x(value: float) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 2), value, dtype=np.float32)}


# -- rate limits ---------------------------------------------------------------------------


def test_token_bucket_burst_then_rate() -> None:
    limiter = RateLimiter([RateLimitRule(models="dig*", rate=2.0, burst=3)])
    now = 100.0
    assert [limiter.acquire("ci", "digits", now) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("ci", "digits", now)
    assert wait == pytest.approx(0.5)
    assert limiter.acquire("ci", "digits", now + 0.5) == 0.0  # refilled one token
    assert limiter.acquire("other-key", "digits", now) == 0.0  # a bucket per caller
    assert limiter.acquire("ci", "mnist", now) == 0.0  # no rule for this model


def test_every_matching_rule_must_admit() -> None:
    limiter = RateLimiter(
        [RateLimitRule(rate=100.0, burst=100), RateLimitRule(keys="free-*", rate=1.0, burst=1)]
    )
    assert limiter.acquire("free-tier", "m", 0.0) == 0.0
    assert limiter.acquire("free-tier", "m", 0.0) == pytest.approx(1.0)
    assert limiter.acquire("paid", "m", 0.0) == 0.0
    assert limiter.acquire("paid", "m", 0.0) == 0.0


# -- the gateway ---------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(demo_store: ModelStore) -> AsyncIterator[InProcessGateway]:
    config = FermionConfig(
        limits=LimitsConfig(rate_limits=[RateLimitRule(models="digits", rate=0.5, burst=3)])
    )
    async with serve_in_process(config, demo_store) as gw:
        yield gw


def test_unknown_model_names_neither_grow_state_nor_readmit_a_limited_caller() -> None:
    """Issue 14 item 8: flooding distinct unknown names once cleared every bucket."""
    limiter = RateLimiter([RateLimitRule(rate=0.001, burst=1)], serves=lambda m: m == "digits")
    assert limiter.acquire("ci", "digits", 0.0) == 0.0
    for i in range(120_000):
        assert limiter.acquire("ci", f"no-such-model-{i}", 1.0) == 0.0
    assert limiter.tracked == 1
    assert limiter.acquire("ci", "digits", 2.0) == pytest.approx(998.0)


def test_idle_buckets_are_swept_and_live_ones_kept() -> None:
    limiter = RateLimiter(
        [RateLimitRule(keys="ci", rate=0.001, burst=1), RateLimitRule(keys="*", rate=100, burst=1)]
    )
    assert limiter.acquire("ci", "m", 0.0) == 0.0
    # 30,000 other callers, one request each, 1 ms apart: each bucket is full again 10 ms on.
    for i in range(30_000):
        assert limiter.acquire(f"ip:10.0.{i // 256}.{i % 256}", "m", 1.0 + i / 1000) == 0.0
    assert limiter.tracked < 10_100  # swept as they piled up, not kept for ever
    assert limiter.acquire("ci", "m", 40.0) == pytest.approx(960.0)  # never reset


@pytest.mark.asyncio(loop_scope="module")
async def test_rate_limit_answers_429_with_retry_after(gateway: InProcessGateway) -> None:
    statuses = []
    rows_before = gateway.computed_rows()
    for _ in range(5):
        r = await gateway.client.post(
            "/v2/models/digits/infer", json=digits_body(), headers={"x-request-id": "rl"}
        )
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert "rate limit" in r.json()["error"]
            assert r.headers["x-request-id"] == "rl"
    assert statuses[:3] == [200, 200, 200]
    assert statuses[3:] == [429, 429]
    assert gateway.computed_rows() - rows_before == 3
    # Metadata is not rate limited.
    assert (await gateway.client.get("/v2/models/digits")).status_code == 200


@pytest.mark.asyncio(loop_scope="module")
async def test_deadlines_and_size_limits(demo_store: ModelStore) -> None:
    config = FermionConfig(limits=LimitsConfig(max_batch=4, max_elements=2 * 784))
    async with serve_in_process(config, demo_store) as gw:
        before = gw.computed_rows()
        r = await gw.client.post(
            "/v2/models/digits/infer",
            json=digits_body(),
            headers={"fermion-timeout-ms": "0.001"},
        )
        assert r.status_code == 504, r.text
        r = await gw.client.post("/v2/models/digits/infer", json=digits_body(timeout=1))
        assert r.status_code == 504, r.text  # V2 timeout: microseconds
        assert gw.computed_rows() == before
        ok = await gw.client.post(
            "/v2/models/digits/infer",
            json=digits_body(timeout=5_000_000),
            headers={"fermion-timeout-ms": "5000"},
        )
        assert ok.status_code == 200
        assert gw.computed_rows() == before + 1
        for headers, body, error in [
            ({"fermion-timeout-ms": "soon"}, digits_body(), "fermion-timeout-ms"),
            ({}, digits_body(priority="high"), "priority"),
            ({}, digits_body(rows=3), "over the limit of 1568"),
            ({}, digits_body(rows=5), "max batch size of 4"),
        ]:
            r = await gw.client.post("/v2/models/digits/infer", json=body, headers=headers)
            assert r.status_code == 400, r.text
            assert error in r.json()["error"]
        assert gw.computed_rows() == before + 1


def test_deadline_is_capped_by_config() -> None:
    limits = RequestLimits(LimitsConfig(max_timeout_ms=100.0, default_timeout_ms=20.0))
    assert limits.deadline_ns(None, {}, 0) == 20_000_000
    assert limits.deadline_ns("5000", {}, 0) == 100_000_000
    assert limits.deadline_ns(None, {"timeout": 3000}, 0) == 3_000_000
    assert limits.deadline_ns("10", {"timeout": 3000}, 0) == 3_000_000
    assert RequestLimits(LimitsConfig()).deadline_ns(None, {"timeout": 0}, 0) is None
    with pytest.raises(InvalidInput):
        limits.deadline_ns("-1", {}, 0)
    # Numbers far past the cap are capped, not overflowed (it was a 500).
    assert limits.deadline_ns("1e308", {}, 0) == 100_000_000
    assert limits.deadline_ns(None, {"timeout": 1e308}, 0) == 100_000_000
    assert limits.deadline_ns("1e308", {"timeout": 1e308}, 0) == 100_000_000
    for bad in ("inf", "nan", "1e400", "true"):
        with pytest.raises(InvalidInput, match="fermion-timeout-ms must be"):
            limits.deadline_ns(bad, {}, 0)
    with pytest.raises(InvalidInput, match="parameter 'timeout' must be"):
        limits.deadline_ns(None, {"timeout": True}, 0)


# -- deadlines and priorities in the batcher ----------------------------------------------------


async def test_request_expiring_in_the_queue_is_dropped_uncomputed() -> None:
    model = _Recorder(delay_s=0.1)
    batcher = DynamicBatcher(model, max_batch_size=8)
    first = asyncio.create_task(batcher.submit(_x(1.0), 1))
    await asyncio.sleep(0.01)  # the first batch is computing; the next requests wait
    soon = time.perf_counter_ns() + 20_000_000
    late = asyncio.create_task(batcher.submit(_x(2.0), 1, deadline_ns=soon))
    patient = asyncio.create_task(batcher.submit(_x(3.0), 1))
    await asyncio.sleep(0.04)
    assert late.done()  # answered at its deadline, not when the runner frees up
    with pytest.raises(DeadlineExceeded):
        await late
    await first
    await patient
    assert model.rows == [1.0, 3.0]
    assert batcher.stats.expired == 1
    assert batcher.queue_depth == 0


async def test_priorities_reorder_the_queue() -> None:
    model = _Recorder(delay_s=0.02)
    batcher = DynamicBatcher(model, max_batch_size=1, priority_levels=3, default_priority_level=2)
    first = asyncio.create_task(batcher.submit(_x(0.0), 1))
    await asyncio.sleep(0.005)
    waiting = [
        asyncio.create_task(batcher.submit(_x(v), 1, priority=p))
        for v, p in [(1.0, 3), (2.0, 0), (3.0, 1), (4.0, 3), (5.0, 1)]
    ]
    await asyncio.gather(first, *waiting)
    # Level 1 first (in arrival order), then the default level 2, then level 3.
    assert model.rows == [0.0, 3.0, 5.0, 2.0, 1.0, 4.0]
    with pytest.raises(InvalidInput, match="3 levels"):
        await batcher.submit(_x(9.0), 1, priority=4)


async def test_one_level_ignores_priority() -> None:
    model = _Recorder(delay_s=0.02)
    batcher = DynamicBatcher(model, max_batch_size=1)
    first = asyncio.create_task(batcher.submit(_x(0.0), 1))
    await asyncio.sleep(0.005)
    rest = [asyncio.create_task(batcher.submit(_x(v), 1, priority=p)) for v, p in [(1, 5), (2, 1)]]
    await asyncio.gather(first, *rest)
    assert model.rows == [0.0, 1.0, 2.0]


async def test_check_raises_rate_limited_with_the_wait() -> None:
    limiter = RateLimiter([RateLimitRule(rate=0.5, burst=1)])
    caller = caller_key(None, "10.0.0.7")
    assert caller == "ip:10.0.0.7" and caller_key("ops", "10.0.0.7") == "ops"
    await limiter.check(caller, "m")
    with pytest.raises(RateLimited, match="rate limit exceeded for m") as raised:
        await limiter.check(caller, "m")
    assert 0.0 < raised.value.retry_after_s <= 2.0
    assert raised.value.headers() == {"Retry-After": "2"}
