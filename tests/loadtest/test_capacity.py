"""The capacity search's bisection, bounds and verdicts (probes as plain functions of the
rate: the search is tested apart from the load it drives)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from loadtest.capacity import (
    ProbeResult,
    format_capacity,
    generator_kept_up,
    search,
    stop_rule,
)
from loadtest.slo import parse_slos


def server(capacity: float, generator_limit: float = 1e9) -> Callable[[float], ProbeResult]:
    """Probes of a server that meets the SLO up to ``capacity`` requests/s."""

    def probe(rate: float) -> ProbeResult:
        sent = min(rate, generator_limit)
        if sent < rate:
            return ProbeResult(rate, None, generator={"achieved_rate": sent})
        p99 = 10.0 if rate <= capacity else 500.0
        return ProbeResult(
            rate,
            rate <= capacity,
            summary={"latency_ms": {"p50": 5.0, "p99": p99}, "error_rate": 0.0},
            generator={"achieved_rate": rate},
        )

    return probe


@pytest.mark.parametrize("capacity", [37.0, 400.0, 1234.0, 9000.0])
def test_the_answer_brackets_the_capacity_within_the_precision(capacity: float) -> None:
    result = search(server(capacity), start=100, min_rate=1, max_rate=1e5, precision=0.05)
    assert result.reason == "found"
    assert result.capacity is not None and result.ceiling is not None
    assert result.capacity <= capacity < result.ceiling <= result.capacity * 1.05
    assert len(result.probes) <= 15


def test_the_bounds_end_the_search_and_say_so() -> None:
    above = search(server(1e9), start=100, min_rate=1, max_rate=1000, precision=0.05)
    assert (above.capacity, above.ceiling) == (1000, None)
    assert "met at the highest rate tried (1000/s)" in above.reason
    below = search(server(0.5), start=100, min_rate=1, max_rate=1000, precision=0.05)
    assert below.capacity is None and "missed even at the lowest rate (1/s)" in below.reason
    assert "capacity: not found" in format_capacity(below, "p99<50ms")


def test_a_generator_that_cannot_send_the_rate_ends_the_search() -> None:
    result = search(
        server(5000, generator_limit=1500), start=100, min_rate=1, max_rate=1e5, precision=0.05
    )
    assert result.capacity == 800 and result.ceiling is None
    assert [p.rate for p in result.probes][-2:] == [1600, 1600]  # tried twice
    assert "could not send 1600/s on time (it sent 1500/s" in result.reason
    text = format_capacity(result, "p99<50ms")
    assert "capacity: at least 800/s" in text and "not judged" in text


def test_a_probe_stops_early_on_the_first_latency_and_error_objectives() -> None:
    rule = stop_rule(parse_slos("p99.9<80ms,errors<1%,p50<5ms"))
    assert (rule.latency_ms, rule.quantile, rule.max_error_rate) == (80.0, 0.999, 0.01)
    assert stop_rule(parse_slos("max<100ms")).quantile == 1.0
    assert stop_rule(parse_slos("mean<3ms")).latency_ms is None


def test_a_probe_is_judged_only_if_the_generator_kept_up() -> None:
    on_time = {"sent": 1000, "late": 5, "achieved_rate": 100.0}
    assert generator_kept_up(on_time, 100.0)
    assert not generator_kept_up({**on_time, "late": 30}, 100.0)  # its delay in the latency
    assert not generator_kept_up({**on_time, "achieved_rate": 90.0}, 100.0)
    assert generator_kept_up({**on_time, "achieved_rate": 40.0}, 100.0, stopped=True)


def test_a_probe_the_generator_failed_once_is_tried_again() -> None:
    tries: list[float] = []
    honest = server(700.0)

    def flaky(rate: float) -> ProbeResult:
        tries.append(rate)
        if rate == 400 and tries.count(400) == 1:
            return ProbeResult(rate, None, generator={"achieved_rate": 300.0})
        return honest(rate)

    result = search(flaky, start=100, min_rate=1, max_rate=1e5, precision=0.05)
    assert result.reason == "found" and tries.count(400) == 2


def test_an_interval_wider_than_the_precision_is_not_called_the_capacity() -> None:
    def probe(rate: float) -> ProbeResult:
        if rate == 283.0:  # the generator fails here, twice
            return ProbeResult(rate, None, generator={"achieved_rate": 135.0})
        return server(250.0)(rate)

    result = search(probe, start=200, min_rate=1, max_rate=283, precision=0.1)
    text = format_capacity(result, "p99<50ms")
    assert result.capacity == 200 and result.ceiling is None
    assert "capacity: at least 200/s" in text
    bracket = search(
        server(250.0), start=200, min_rate=1, max_rate=1e5, precision=0.1, max_probes=3
    )
    line = format_capacity(bracket, "p99<50ms").splitlines()[-1]
    assert line.startswith("capacity: between 200/s (meets p99<50ms) and 282.8/s (misses it)")
    assert "not narrowed to 10%: stopped after 3 probes" in line
