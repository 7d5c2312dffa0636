"""Retry-After: one rule for every error that asks the client to come back."""

from __future__ import annotations

import pytest

from serving.errors import ModelNotReady, Overloaded, RateLimited, retry_after


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.2, "2"), (1.5, "2"), (2.6, "3"), (30.0, "30")],
)
def test_retry_after_is_whole_seconds_rounded_up_at_least_one(seconds: float, header: str) -> None:
    assert retry_after(seconds) == header
    assert RateLimited("slow down", retry_after_s=seconds).headers() == {"Retry-After": header}
    assert Overloaded("queue full", retry_after_s=seconds).headers() == {"Retry-After": header}


def test_statuses_and_model_not_ready_retry_after() -> None:
    assert RateLimited("x").status_code == 429
    assert Overloaded("x").status_code == 503
    assert ModelNotReady("loading").status_code == 503
    assert ModelNotReady("loading").headers() == {"Retry-After": "1"}
