"""A synthetic load test: what a recorder would hold after a 10-second A/B run."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.recorder import Recorder

T0 = 1_800_000_000


def raw_run(slow: float = 1.0, failures: int = 10) -> dict[str, Any]:
    """1000 successes over 10 s with latencies 1..100 ms (x ``slow``), 60% served by v1 and
    40% by v2, plus ``failures`` 503s, and 8 users sampled each second."""
    rec = Recorder()
    for i in range(1000):
        version = "1" if i % 5 < 3 else "2"
        rec.record(T0 + i / 100 + 0.005, ((i % 100) + 1) * slow, version, None)
    for k in range(failures):
        rec.record(T0 + 5.5 + k / 100, 0.5, None, "503 queue full: 2048 waiting")
    for s in range(10):
        rec.sample_users(T0 + s, 8)
    data = rec.to_dict()
    data["workers"] = 2
    return data


@pytest.fixture
def raw() -> dict[str, Any]:
    return raw_run()
