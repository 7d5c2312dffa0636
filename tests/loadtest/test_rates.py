"""Rate plans: what ``--rate`` accepts, and the send times a plan gives."""

from __future__ import annotations

import itertools

import pytest

from loadtest.rates import RatePlan, Segment, parse_rate, parse_rate_value


def test_rate_values_and_units() -> None:
    assert parse_rate_value("2000/s") == 2000
    assert parse_rate_value("600/m") == 10
    assert parse_rate_value("25") == 25
    assert parse_rate_value(" 7200 / h ") == 2
    for bad in ("fast", "10/d", "-5/s", ""):
        with pytest.raises(ValueError, match="invalid rate"):
            parse_rate_value(bad)


def test_a_constant_rate_sends_evenly_for_the_duration() -> None:
    plan = parse_rate("200/s", 3)
    assert plan.describe() == "200/s for 3s"
    times = list(plan.send_times())
    assert len(times) == 600
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(times)}
    assert gaps == {0.005}
    assert times[0] == pytest.approx(0.0025) and times[-1] < 3


def test_steps_share_the_duration_and_keep_their_own_lengths() -> None:
    plan = parse_rate("100/s,300/s", 10)
    assert [s.duration_s for s in plan.segments] == [5, 5]
    assert plan.total == 2000
    times = list(plan.send_times())
    assert sum(t < 5 for t in times) == 500 and sum(t >= 5 for t in times) == 1500
    fixed = parse_rate("50/s:2s,10/s", 6)
    assert [s.duration_s for s in fixed.segments] == [2, 4]
    assert parse_rate("50/s:2s,10/s:3s").duration_s == 5


def test_a_ramp_sends_more_and_more() -> None:
    plan = parse_rate("100..300/s", 10)
    assert plan.segments == (Segment(100, 300, 10),)
    assert plan.total == pytest.approx(2000)
    assert plan.rate_at(5) == pytest.approx(200)
    times = list(plan.send_times())
    assert len(times) == 2000
    first, last = sum(t < 1 for t in times), sum(t >= 9 for t in times)
    assert first == pytest.approx(110, abs=1) and last == pytest.approx(290, abs=1)
    assert all(b > a for a, b in itertools.pairwise(times))


def test_workers_interleave_their_shares_into_the_whole_plan() -> None:
    plan = parse_rate("300/s", 2)
    shares = [list(plan.scaled(1 / 3).send_times(phase=(i + 0.5) / 3)) for i in range(3)]
    merged = sorted(t for share in shares for t in share)
    assert len(merged) == 600
    gaps = [b - a for a, b in itertools.pairwise(merged)]
    assert min(gaps) == pytest.approx(1 / 300) and max(gaps) == pytest.approx(1 / 300)


def test_poisson_arrivals_keep_the_rate_with_random_gaps() -> None:
    plan = parse_rate("1000/s", 5)
    times = list(plan.send_times("poisson", seed=7))
    assert len(times) == pytest.approx(5000, rel=0.05)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) > 5 * min(gaps)
    assert times == list(plan.send_times("poisson", seed=7))


def test_bad_plans_are_refused_with_their_reason() -> None:
    with pytest.raises(ValueError, match="need a --duration"):
        parse_rate("100/s,200/s")
    with pytest.raises(ValueError, match="sends nothing"):
        parse_rate("0/s", 5)
    with pytest.raises(ValueError, match="invalid rate"):
        parse_rate("100/s,,200/s", 5)
    with pytest.raises(ValueError, match="invalid duration"):
        parse_rate("100/s:soon", 5)
    with pytest.raises(ValueError, match="unknown arrival"):
        list(RatePlan((Segment(1, 1, 1),)).send_times("bursty"))
