"""The server side of a report: /metrics text read tolerantly, deltas summed over a fleet."""

from __future__ import annotations

import pytest

from loadtest.server_metrics import Snapshot, breakdown, histogram_quantile, parse_samples


def exposition(requests: int, queue_slow: int, batches: int, shed: int, full: int) -> str:
    """Metrics text as a gateway exposes it: ``requests`` queued (``queue_slow`` of them
    over 50 ms), ``batches`` batches of 4 rows computed in 2-5 ms each."""
    fast = requests - queue_slow
    return f"""# HELP fermion_queue_duration_seconds Time requests waited for a batch.
# TYPE fermion_queue_duration_seconds histogram
fermion_queue_duration_seconds_bucket{{model="digits",version="2",le="0.001"}} {fast}.0
fermion_queue_duration_seconds_bucket{{model="digits",version="2",le="0.05"}} {fast}.0
fermion_queue_duration_seconds_bucket{{model="digits",version="2",le="0.1"}} {requests}.0
fermion_queue_duration_seconds_bucket{{model="digits",version="2",le="+Inf"}} {requests}.0
fermion_queue_duration_seconds_sum{{model="digits",version="2"}} {queue_slow * 0.075}
fermion_queue_duration_seconds_count{{model="digits",version="2"}} {requests}.0
fermion_compute_duration_seconds_bucket{{model="digits",version="2",le="0.002"}} 0.0
fermion_compute_duration_seconds_bucket{{model="digits",version="2",le="0.005"}} {batches}.0
fermion_compute_duration_seconds_bucket{{model="digits",version="2",le="+Inf"}} {batches}.0
fermion_compute_duration_seconds_sum{{model="digits",version="2"}} {batches * 0.0035}
fermion_compute_duration_seconds_count{{model="digits",version="2"}} {batches}.0
fermion_batch_size_bucket{{model="digits",version="2",le="2.0"}} 0.0
fermion_batch_size_bucket{{model="digits",version="2",le="4.0"}} {batches}.0
fermion_batch_size_bucket{{model="digits",version="2",le="+Inf"}} {batches}.0
fermion_batch_size_sum{{model="digits",version="2"}} {batches * 4}.0
fermion_batch_size_count{{model="digits",version="2"}} {batches}.0
# a family this reader does not know, and a line it cannot parse
fermion_something_new{{model="digits"}} 3
fermion_rejected_requests_total{{model="digits",reason="queue_full"}} {full}.0
fermion_rejected_requests_total{{model="",reason="unauthenticated"}} 1.0
fermion_shadow_requests_total{{model="digits",primary="2",shadow="1",outcome="shed"}} {shed}.0
fermion_shadow_requests_total{{model="digits",primary="2",shadow="1",outcome="ok"}} 5.0
fermion_batch_size_bucket{{broken
"""


def snap(url: str, text: str) -> Snapshot:
    return Snapshot(url, parse_samples(text))


def test_unknown_and_broken_lines_are_skipped() -> None:
    samples = parse_samples(exposition(10, 2, 3, 0, 0) + "garbage line here\n")
    assert "fermion_something_new" not in samples
    assert samples["fermion_batch_size_count"] == {(("model", "digits"), ("version", "2")): 3.0}
    assert parse_samples('fermion_queue_duration_seconds_count{model="a\\"b"} 1\n') == {
        "fermion_queue_duration_seconds_count": {(("model", 'a"b'),): 1.0}
    }


def test_quantiles_interpolate_within_buckets_like_prometheus() -> None:
    buckets = {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx((0.1, False))
    assert histogram_quantile(0.75, buckets) == pytest.approx((0.15, False))
    assert histogram_quantile(0.5, {1.0: 0.0, float("inf"): 0.0}) is None
    # beyond the last finite bound: only a lower bound is known
    assert histogram_quantile(0.99, {0.1: 90.0, float("inf"): 100.0}) == (0.1, True)


def test_a_run_is_the_difference_between_two_scrapes() -> None:
    before = [snap("g1", exposition(100, 0, 25, 0, 0))]
    after = [snap("g1", exposition(300, 20, 75, 7, 3))]
    report = breakdown(before, after)
    row = report["versions"]["digits v2"]
    assert row["requests"] == 200 and row["batches"] == 50
    assert row["queue_ms"]["p50"] == pytest.approx(0.5556, rel=1e-3)
    assert row["queue_ms"]["p99"] == pytest.approx(95.0)
    assert row["compute_ms"]["p50"] == pytest.approx(3.5) and row["compute_ms"]["above"] == []
    assert row["batch_size"]["mean"] == 4.0
    assert [b["count"] for b in row["batch_size"]["buckets"]] == [0, 50, 0]
    assert row["cause"] == "queueing"
    assert report["rejected"] == [{"model": "digits", "reason": "queue_full", "count": 3}]
    shadow = {r["outcome"]: r["count"] for r in report["shadow"]}
    assert shadow == {"shed": 7}  # ok copies did not change in the run


def test_a_fleet_is_summed_and_an_unreachable_gateway_is_named() -> None:
    before = [snap("g1", exposition(0, 0, 0, 0, 0)), snap("g2", exposition(0, 0, 0, 0, 0))]
    after = [
        snap("g1", exposition(100, 0, 25, 0, 0)),
        snap("g2", exposition(60, 0, 15, 0, 0)),
        Snapshot("g3", error="GET g3/metrics: connection refused"),
    ]
    report = breakdown(before, after)
    assert report["versions"]["digits v2"]["requests"] == 160
    assert report["versions"]["digits v2"]["cause"] == "compute"
    assert [g["ok"] for g in report["gateways"]] == [True, True, False]
    assert "connection refused" in report["gateways"][2]["error"]


def test_a_restarted_gateway_counts_what_it_has_since() -> None:
    before = [snap("g1", exposition(500, 0, 100, 0, 0))]
    after = [snap("g1", exposition(40, 0, 10, 0, 0))]
    assert breakdown(before, after)["versions"]["digits v2"]["requests"] == 40
