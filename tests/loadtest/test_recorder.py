"""The recorder: latency buckets, per-second histograms, drain and merge across workers."""

from __future__ import annotations

import json

import pytest

from loadtest.recorder import FAILED, Recorder, latency_bucket


@pytest.mark.parametrize("ms", [0.0004, 0.0123, 0.987, 1.2345, 17.77, 999.5, 12345.6])
def test_buckets_are_within_half_a_percent(ms: float) -> None:
    us = ms * 1000
    bucket = latency_bucket(ms)
    assert abs(bucket - us) <= max(0.5, us * 0.005)


def test_records_versions_errors_and_users_per_second() -> None:
    rec = Recorder()
    rec.record(100.2, 5.0, "1", None)
    rec.record(100.7, 5.0, "2", None)
    rec.record(101.1, 7.0, None, "503 queue full")
    rec.record(101.3, 2.0, None, None)
    rec.sample_users(101.0, 4)
    data = rec.to_dict()
    assert rec.requests == 4
    assert data["start"] == pytest.approx(100.195)
    assert data["end"] == pytest.approx(101.3)
    assert data["seconds"]["100"]["latency"] == {"1": {"5000": 1}, "2": {"5000": 1}}
    assert data["seconds"]["101"]["latency"] == {FAILED: {"7000": 1}, "?": {"2000": 1}}
    assert data["seconds"]["101"]["errors"] == {"503 queue full": 1}
    assert data["seconds"]["101"]["users"] == 4
    assert json.loads(json.dumps(data)) == data


def test_drained_workers_merge_into_the_same_totals() -> None:
    workers = [Recorder(), Recorder()]
    for i, rec in enumerate(workers):
        for k in range(10):
            rec.record(200.0 + k / 10, 1.0 + i, "2", None)
        rec.record(201.5, 3.0, None, "500 boom")
    master = Recorder()
    master.merge(workers[0].drain())
    master.merge(workers[1].drain())
    master.merge(workers[0].drain())  # an empty report changes nothing
    assert workers[0].requests == 0
    assert master.requests == 22
    data = master.to_dict()
    assert data["seconds"]["200"]["latency"]["2"] == {"1000": 10, "2000": 10}
    assert data["seconds"]["201"]["errors"] == {"500 boom": 2}
    assert data["start"] == pytest.approx(199.998)  # the earliest request of any worker
