"""The open-loop engine's own bookkeeping: fail-fast, its stats, workers' merge."""

from __future__ import annotations

import pytest

from loadtest.openloop import EngineStats, FailFast, Tick
from loadtest.transport import Outcome

REFUSED = Outcome(400, error="400 batch of 100 rows is over the max batch size 64")


def test_a_run_whose_answers_all_refuse_the_request_stops_with_the_message() -> None:
    stop = FailFast(after=3)
    assert stop(REFUSED) is None and stop(REFUSED) is None
    reason = stop(REFUSED)
    assert reason is not None and "max batch size 64" in reason


def test_busy_answers_and_any_success_never_stop_a_run() -> None:
    busy = FailFast(after=2)
    assert all(busy(Outcome(503, error="503 queue full")) is None for _ in range(10))
    assert all(busy(Outcome(429, error="429 rate limited")) is None for _ in range(10))
    once_ok = FailFast(after=2)
    assert once_ok(Outcome(200, version="1")) is None
    assert all(once_ok(REFUSED) is None for _ in range(10))  # now a result to measure


def test_achieved_rate_says_when_sending_fell_behind_or_stopped() -> None:
    on_time = EngineStats(scheduled=200, sent=200, plan_s=2.0, last_lag_s=0.004)
    assert on_time.achieved_rate == 100.0 == on_time.target_rate
    behind = EngineStats(scheduled=200, sent=200, plan_s=2.0, last_lag_s=0.51)
    assert behind.achieved_rate == pytest.approx(80.0)
    stopped = EngineStats(scheduled=200, sent=120, unsent=80, plan_s=2.0)
    assert stopped.achieved_rate == 60.0


def test_workers_figures_merge() -> None:
    a = EngineStats(scheduled=100, sent=100, completed=99, late=1, plan_s=1.0, lag={500: 100})
    b = EngineStats(scheduled=100, sent=90, completed=90, unsent=10, plan_s=1.0, lag={900: 90})
    a.merge(EngineStats.from_dict(b.to_dict()))
    assert (a.scheduled, a.sent, a.completed, a.late, a.unsent) == (200, 190, 189, 1, 10)
    assert a.to_dict()["lag_ms"] == {"p50": 0.5, "p99": 0.9, "max": 0.9}
    t = Tick(3, sent=10, done=9, errors=1, in_flight=2, latency={1000: 9})
    t.merge(Tick.from_dict(Tick(3, sent=5, done=5, latency={2000: 5}).to_dict()))
    assert (t.sent, t.done, t.errors, t.latency) == (15, 14, 1, {1000: 9, 2000: 5})
