"""Which upstreams get batches: spreading, active checks, passive ejection, circuit breakers."""

from __future__ import annotations

import asyncio

import pytest

from serving.config import RemoteSettings, UpstreamHealthConfig
from serving.inference.upstream.http_client import HttpUpstreamClient
from serving.inference.upstream.pool import Circuit, Upstream, UpstreamPool

HEALTH = UpstreamHealthConfig(
    interval_s=0.05, timeout_s=0.2, failures_to_open=2, open_s=0.05, max_open_s=0.15
)


class _Probe:
    """Each upstream's health as the test sets it: None is ready, a string why not."""

    def __init__(self) -> None:
        self.reasons: dict[str, str | None] = {}
        self.checked_metadata: list[str] = []
        self.hang = False

    async def __call__(self, upstream: Upstream, back: bool) -> str | None:
        if self.hang:
            await asyncio.sleep(10)
        if back:
            self.checked_metadata.append(upstream.url)
        return self.reasons.get(upstream.url)


async def _pool(n: int = 2) -> tuple[UpstreamPool, _Probe]:
    probe = _Probe()
    urls = [f"http://127.0.0.1:{9 + i}" for i in range(n)]
    upstreams = [Upstream(url, HttpUpstreamClient(url, RemoteSettings())) for url in urls]
    pool = UpstreamPool(upstreams, HEALTH, probe, "m v1")
    await pool.check()
    return pool, probe


async def test_nothing_is_picked_before_a_check_passed() -> None:
    probe = _Probe()
    u = Upstream("http://127.0.0.1:9", HttpUpstreamClient("http://127.0.0.1:9", RemoteSettings()))
    pool = UpstreamPool([u], HEALTH, probe, "m v1")
    assert not pool.up
    assert pool.pick() is None
    await pool.check()
    assert pool.pick() is u
    assert probe.checked_metadata == [u.url]  # checked when it came up, not after
    await pool.check()
    assert probe.checked_metadata == [u.url]


async def test_batches_spread_in_turn_and_prefer_the_least_loaded() -> None:
    pool, _ = await _pool(3)
    a, b, c = pool.upstreams
    assert [pool.pick() for _ in range(6)] == [a, b, c, a, b, c]
    a.in_flight, b.in_flight = 2, 1
    assert pool.pick() is c
    c.in_flight = 3
    assert pool.pick() is b
    assert pool.pick(exclude=[b]) is a


async def test_a_failed_check_ejects_an_upstream_and_a_passing_one_brings_it_back() -> None:
    pool, probe = await _pool(2)
    a, b = pool.upstreams
    probe.reasons[a.url] = "server not ready"
    await pool.check()
    assert (a.healthy, a.reason, a.ejections) == (False, "server not ready", 1)
    assert [pool.pick() for _ in range(3)] == [b, b, b]
    probe.reasons[a.url] = None
    await pool.check()
    assert a.up and a.reason == ""
    assert {pool.pick(), pool.pick()} == {a, b}


async def test_a_check_that_hangs_counts_as_failed() -> None:
    pool, probe = await _pool(1)
    probe.hang = True
    await pool.check()
    assert not pool.up
    assert pool.upstreams[0].reason == "no answer to the health check within 0.2s"


async def test_batches_without_answer_open_the_circuit_then_one_trial_decides() -> None:
    pool, _ = await _pool(1)
    (u,) = pool.upstreams
    pool.no_answer(u, "cannot connect")
    assert u.up  # one is not enough
    pool.answered(u, 0.01, ok=False)  # an error answer is an answer: the count restarts
    pool.no_answer(u, "cannot connect")
    assert u.up
    pool.no_answer(u, "cannot connect")
    assert not u.up and not pool.up and u.ejections == 1
    assert u.circuit == "open"
    assert pool.pick() is None
    await asyncio.sleep(HEALTH.open_s * 1.5)
    assert pool.up
    assert pool.pick() is u and u.circuit is Circuit.HALF_OPEN
    assert pool.pick() is None  # one trial at a time
    pool.no_answer(u, "cannot connect")  # the trial failed: open twice as long
    assert u.circuit is Circuit.OPEN and u.open_for == pytest.approx(2 * HEALTH.open_s)
    await asyncio.sleep(HEALTH.open_s * 1.5)
    assert pool.pick() is None  # not yet: 2 x open_s
    await asyncio.sleep(HEALTH.open_s)
    assert pool.pick() is u
    pool.answered(u, 0.01, ok=True)
    assert u.circuit is Circuit.CLOSED and u.open_for == HEALTH.open_s
    assert u.outcomes == {"error": 1, "unavailable": 4, "ok": 1}


async def test_the_open_time_doubles_up_to_its_bound() -> None:
    pool, _ = await _pool(1)
    (u,) = pool.upstreams
    for _ in range(HEALTH.failures_to_open):
        pool.no_answer(u, "reset")
    for expected in (0.1, 0.15, 0.15):
        u.open_until = 0.0  # due for its trial now
        assert pool.pick() is u
        pool.no_answer(u, "reset")
        assert u.open_for == pytest.approx(expected)


async def test_an_upstream_back_from_a_failed_check_starts_with_a_closed_circuit() -> None:
    pool, probe = await _pool(1)
    (u,) = pool.upstreams
    for _ in range(HEALTH.failures_to_open):
        pool.no_answer(u, "reset")
    await pool.check()  # still passing: the circuit stays open until its trial
    assert u.circuit == "open" and not u.up
    probe.reasons[u.url] = "down"
    await pool.check()
    probe.reasons[u.url] = None
    await pool.check()
    assert u.up and u.circuit is Circuit.CLOSED


async def test_checks_run_every_interval_until_stopped() -> None:
    pool, probe = await _pool(1)
    (u,) = pool.upstreams
    pool.start()
    probe.reasons[u.url] = "down"
    for _ in range(100):
        if not u.healthy:
            break
        await asyncio.sleep(HEALTH.interval_s / 2)
    assert not u.healthy
    await pool.stop()
    probe.reasons[u.url] = None
    await asyncio.sleep(HEALTH.interval_s * 3)
    assert not u.healthy  # no check ran after stop
