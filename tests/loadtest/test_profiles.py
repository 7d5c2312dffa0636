"""Load shapes: users over the length of a test."""

from __future__ import annotations

import pytest

from loadtest.profiles import target


def users(shape: str, duration: float = 100.0, **kw: int) -> list[int]:
    out = []
    for t in range(int(duration)):
        step = target(shape, float(t), 40, 10.0, duration, **kw)
        assert step is not None
        out.append(step[0])
    assert target(shape, duration, 40, 10.0, duration) is None
    return out


def test_steady_holds_the_users() -> None:
    assert set(users("steady")) == {40}


def test_ramp_grows_to_the_users() -> None:
    seen = users("ramp")
    assert seen[0] == 1
    assert seen == sorted(seen)
    assert seen[-1] == 40


def test_step_climbs_in_plateaus() -> None:
    seen = users("step", steps=4)
    assert sorted(set(seen)) == [10, 20, 30, 40]
    assert seen == sorted(seen)


def test_spike_jumps_in_the_middle_and_back() -> None:
    seen = users("spike")
    assert seen[0] == seen[-1] == 10
    assert seen[50] == 40
    assert seen.count(40) == 20
    step = target("spike", 50.0, 40, 2.0, 100.0)
    assert step is not None and step[1] >= 40  # spawned at once, not at the ramp's rate


def test_unknown_shape() -> None:
    with pytest.raises(ValueError, match="unknown shape"):
        target("sine", 1.0, 10, 1.0, 10.0)
