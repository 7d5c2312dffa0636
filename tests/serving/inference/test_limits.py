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
from tests.helpers.ab_models import MODEL, v2_body
from tests.helpers.inprocess import InProcessGateway, serve_in_process

_INFER = f"/v2/models/{MODEL}/infer"


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


@pytest.mark.parametrize(
    ("rate", "elapsed_s"),
    [(0.5, 0.0), (0.5, 1.0), (0.5, 1.5), (2.0, 0.0), (2.0, 0.2), (3.0, 0.1), (0.1, 4.0)],
)
def test_the_wait_is_the_time_to_the_next_token_and_admits_then(
    rate: float, elapsed_s: float
) -> None:
    limiter = RateLimiter([RateLimitRule(rate=rate, burst=1)])
    assert limiter.acquire("ci", "m", 0.0) == 0.0  # the one saved token
    tokens = elapsed_s * rate  # refilled since
    wait = limiter.acquire("ci", "m", elapsed_s)
    assert wait == pytest.approx((1.0 - tokens) / rate)
    # Refused a little before the wait is over (and that refusal takes no token) ...
    assert limiter.acquire("ci", "m", elapsed_s + wait * 0.9) > 0.0
    # ... admitted once it is, and then empty again.
    assert limiter.acquire("ci", "m", elapsed_s + wait) == 0.0
    assert limiter.acquire("ci", "m", elapsed_s + wait) == pytest.approx(1.0 / rate)


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
async def gateway(ab_store: ModelStore) -> AsyncIterator[InProcessGateway]:
    config = FermionConfig(
        limits=LimitsConfig(rate_limits=[RateLimitRule(models=MODEL, rate=0.5, burst=3)])
    )
    async with serve_in_process(config, ab_store) as gw:
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
        r = await gateway.client.post(_INFER, json=v2_body(), headers={"x-request-id": "rl"})
        statuses.append(r.status_code)
        if r.status_code == 429:
            # The burst is spent: the next token is (1 - tokens) / rate = 2 s away at 0.5/s
            # (less the few ms these requests took, still 2 once rounded up).
            assert r.headers["retry-after"] == "2"
            assert "rate limit" in r.json()["error"]
            assert r.headers["x-request-id"] == "rl"
    assert statuses[:3] == [200, 200, 200]
    assert statuses[3:] == [429, 429]
    assert gateway.computed_rows() - rows_before == 3
    # Metadata is not rate limited.
    assert (await gateway.client.get(f"/v2/models/{MODEL}")).status_code == 200


@pytest.mark.asyncio(loop_scope="module")
async def test_deadlines_and_size_limits(ab_store: ModelStore) -> None:
    config = FermionConfig(limits=LimitsConfig(max_batch=4, max_elements=2 * 4))
    async with serve_in_process(config, ab_store) as gw:
        before = gw.computed_rows()
        r = await gw.client.post(
            _INFER,
            json=v2_body(),
            headers={"fermion-timeout-ms": "0.001"},
        )
        assert r.status_code == 504, r.text
        r = await gw.client.post(_INFER, json=v2_body(timeout=1))
        assert r.status_code == 504, r.text  # V2 timeout: microseconds
        assert gw.computed_rows() == before
        ok = await gw.client.post(
            _INFER,
            json=v2_body(timeout=5_000_000),
            headers={"fermion-timeout-ms": "5000"},
        )
        assert ok.status_code == 200
        assert gw.computed_rows() == before + 1
        for headers, body, error in [
            ({"fermion-timeout-ms": "soon"}, v2_body(), "fermion-timeout-ms"),
            ({}, v2_body(priority="high"), "priority"),
            ({}, v2_body(rows=3), "over the limit of 8"),
            ({}, v2_body(rows=5), "max batch size of 4"),
        ]:
            r = await gw.client.post(_INFER, json=body, headers=headers)
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


@pytest.mark.parametrize(
    ("header", "parameters", "message"),
    [
        ("-1", {}, "fermion-timeout-ms must be a non-negative number"),
        ("nan", {}, "fermion-timeout-ms must be a non-negative number"),
        ("inf", {}, "fermion-timeout-ms must be a non-negative number"),
        ("soon", {}, "fermion-timeout-ms must be a number, got 'soon'"),
        ("0", {}, "fermion-timeout-ms must be above 0"),
        (None, {"timeout": -5}, "parameter 'timeout' must be a non-negative number"),
        (None, {"timeout": True}, "parameter 'timeout' must be a non-negative number"),
        (None, {"timeout": [1]}, "parameter 'timeout' must be a number, got '[1]'"),
    ],
)
def test_a_bad_deadline_is_refused_naming_its_source(
    header: str | None, parameters: dict[str, object], message: str
) -> None:
    limits = RequestLimits(LimitsConfig())
    with pytest.raises(InvalidInput) as raised:
        limits.deadline_ns(header, parameters, 0)
    assert raised.value.message == message


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
    waiting.append(asyncio.create_task(batcher.submit(_x(6.0), 1)))  # no priority given
    await asyncio.gather(first, *waiting)
    # Level 1 first (in arrival order), then the default level 2, then level 3.
    assert model.rows == [0.0, 3.0, 5.0, 2.0, 6.0, 1.0, 4.0]
    with pytest.raises(InvalidInput) as raised:
        await batcher.submit(_x(9.0), 1, priority=4)
    assert raised.value.message == "priority 4 is over this model's 3 levels"


async def test_the_default_level_may_be_the_lowest() -> None:
    model = _Recorder(delay_s=0.02)
    batcher = DynamicBatcher(model, max_batch_size=1, priority_levels=2, default_priority_level=2)
    first = asyncio.create_task(batcher.submit(_x(0.0), 1))
    await asyncio.sleep(0.005)
    rest = [asyncio.create_task(batcher.submit(_x(1.0), 1))]
    rest.append(asyncio.create_task(batcher.submit(_x(2.0), 1, priority=1)))
    await asyncio.gather(first, *rest)
    assert model.rows == [0.0, 2.0, 1.0]


@pytest.mark.parametrize(("levels", "default"), [(3, 4), (0, 2), (2, -1)])
def test_a_default_level_outside_the_levels_is_refused(levels: int, default: int) -> None:
    with pytest.raises(ValueError) as raised:
        DynamicBatcher(
            _Recorder(), max_batch_size=1, priority_levels=levels, default_priority_level=default
        )
    assert str(raised.value) == "default_priority_level must be within the priority levels"


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
    # A client without an address is still one caller (not a bucket per request).
    assert caller_key(None, None) == caller_key(None, "") == "ip:?"


async def test_a_wait_under_a_second_is_refused_too() -> None:
    limiter = RateLimiter([RateLimitRule(rate=4.0, burst=1)])
    await limiter.check("ci", "m")
    with pytest.raises(RateLimited) as raised:  # the next token is 0.25 s away
        await limiter.check("ci", "m")
    assert 0.0 < raised.value.retry_after_s <= 0.25
    assert raised.value.headers() == {"Retry-After": "1"}  # whole seconds, rounded up


def test_a_rule_bucket_is_shared_by_every_model_its_glob_matches() -> None:
    limiter = RateLimiter([RateLimitRule(models="dig*", rate=1.0, burst=2)])
    assert limiter.acquire("ci", "digits", 0.0) == 0.0
    assert limiter.acquire("ci", "digits-v2", 0.0) == 0.0  # the same bucket: now empty
    assert limiter.acquire("ci", "digits", 0.0) == pytest.approx(1.0)
    assert limiter.acquire("ci", "digits-v2", 0.0) == pytest.approx(1.0)
    assert limiter.acquire("ci", "digits-v2", 1.0) == 0.0


def test_a_deadline_header_in_milliseconds_and_the_v2_timeout_in_microseconds() -> None:
    limits = RequestLimits(LimitsConfig(max_timeout_ms=100.0, default_timeout_ms=20.0))
    assert limits.deadline_ns("10", {}, 5) == 5 + 10_000_000
    assert limits.deadline_ns("2.5", {}, 0) == 2_500_000
    # The V2 timeout replaces the default (longer or shorter); with the header, the
    # shorter of the two applies.
    assert limits.deadline_ns(None, {"timeout": 50_000}, 0) == 50_000_000
    assert limits.deadline_ns("1", {"timeout": 3000}, 0) == 1_000_000
    assert limits.deadline_ns("10", {"timeout": 3000}, 0) == 3_000_000
    assert limits.deadline_ns("10", {"timeout": 0}, 0) == 10_000_000  # 0: none


def test_a_bad_value_is_echoed_cut_at_40_characters() -> None:
    with pytest.raises(InvalidInput) as raised:
        RequestLimits(LimitsConfig()).deadline_ns("x" * 100, {}, 0)
    assert raised.value.message == f"fermion-timeout-ms must be a number, got {'x' * 40!r}"


@pytest.mark.parametrize(
    ("parameters", "level"),
    [({}, 0), ({"other": 1}, 0), ({"priority": 0}, 0), ({"priority": 1}, 1), ({"priority": 7}, 7)],
)
def test_the_priority_parameter(parameters: dict[str, object], level: int) -> None:
    assert RequestLimits.priority(parameters) == level


@pytest.mark.parametrize("value", [-1, True, 1.0, "1", None])
def test_a_bad_priority_is_refused(value: object) -> None:
    with pytest.raises(InvalidInput) as raised:
        RequestLimits.priority({"priority": value})
    assert raised.value.message == "parameter 'priority' must be a non-negative integer"


def test_the_element_limit_admits_a_request_at_the_limit() -> None:
    limits = RequestLimits(LimitsConfig(max_elements=8))
    limits.check_elements({"x": np.zeros((2, 4), np.float32)})
    with pytest.raises(InvalidInput, match="request has 9 elements, over the limit of 8"):
        limits.check_elements({"x": np.zeros((1, 4), np.float32), "y": np.zeros(5, np.float32)})


async def test_requests_expiring_in_the_queue_fail_with_their_reason_and_are_counted() -> None:
    model = _Recorder(delay_s=0.1)
    batcher = DynamicBatcher(model, max_batch_size=1)
    first = asyncio.create_task(batcher.submit(_x(1.0), 1))
    await asyncio.sleep(0.01)
    soon = time.perf_counter_ns() + 10_000_000
    late = [asyncio.create_task(batcher.submit(_x(v), 1, deadline_ns=soon)) for v in (2.0, 3.0)]
    for task in late:
        with pytest.raises(DeadlineExceeded) as raised:
            await task
        assert raised.value.message == "deadline passed while the request was queued"
    await first
    assert model.rows == [1.0] and batcher.stats.expired == 2


async def test_a_request_computing_when_its_deadline_passes_is_answered() -> None:
    # Only a waiting request is dropped at its deadline; one already computing is not.
    model = _Recorder(delay_s=0.05)
    batcher = DynamicBatcher(model, max_batch_size=8)
    deadline = time.perf_counter_ns() + 10_000_000
    out = await batcher.submit(_x(1.0), 1, deadline_ns=deadline)
    assert time.perf_counter_ns() > deadline  # answered after it
    np.testing.assert_array_equal(out["y"], _x(1.0)["x"])
    assert model.rows == [1.0] and batcher.stats.expired == 0
