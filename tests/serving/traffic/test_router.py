"""Traffic splits: proportions within a statistical bound, sticky keys, monotone moves."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from serving.config import ConfigError, RouteConfig, load_config
from serving.traffic.split import ModelRoute, TrafficSplit

# Chi-square critical values at p = 0.001: a correct split fails this 1 time in 1000
# (the draws are seeded, so the suite itself is deterministic).
_CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266}
# Binomial checks allow 4.5 standard deviations (two-sided p ~ 7e-6).
_Z = 4.5


def _chi_square(counts: dict[str, int], shares: dict[int, float], n: int) -> float:
    return sum((counts.get(str(v), 0) - n * p) ** 2 / (n * p) for v, p in shares.items() if p > 0)


@pytest.mark.parametrize(
    "weights",
    [{1: 90, 2: 10}, {1: 70, 2: 20, 3: 10}, {1: 1, 2: 1, 3: 1, 4: 1}, {1: 99, 2: 1}],
)
def test_random_split_matches_weights_chi_square(weights: dict[int, float]) -> None:
    n = 200_000
    split = TrafficSplit(weights, random.Random(1234).random)
    counts: dict[str, int] = {}
    for _ in range(n):
        v = split.pick()
        counts[v] = counts.get(v, 0) + 1
    stat = _chi_square(counts, split.shares(), n)
    assert stat < _CHI2_999[len(weights) - 1], (counts, stat)


def test_a_wrong_split_fails_the_same_bound() -> None:
    """The bound has power: 90/10 draws tested against a claimed 89/11 are rejected."""
    n = 200_000
    split = TrafficSplit({1: 90, 2: 10}, random.Random(1234).random)
    counts: dict[str, int] = {}
    for _ in range(n):
        v = split.pick()
        counts[v] = counts.get(v, 0) + 1
    assert _chi_square(counts, {1: 0.89, 2: 0.11}, n) > _CHI2_999[1]


def test_zero_weight_versions_never_answer() -> None:
    split = TrafficSplit({1: 0, 2: 5, 3: 0}, random.Random(1).random)
    assert {split.pick() for _ in range(1000)} == {"2"}
    assert {split.pick_sticky(f"user-{i}") for i in range(1000)} == {"2"}
    assert split.shares() == {1: 0.0, 2: 1.0, 3: 0.0}
    with pytest.raises(ValueError) as raised:
        TrafficSplit({1: 0})
    assert str(raised.value) == "a split needs at least one version with a positive weight"


def _keys(n: int) -> list[str]:
    return [f"user-{i}" for i in range(n)]


def test_sticky_keys_keep_their_version_and_follow_the_weights() -> None:
    keys = _keys(20_000)
    split = TrafficSplit({1: 80, 2: 20})
    first = {k: split.pick_sticky(k) for k in keys}
    again = TrafficSplit({1: 80, 2: 20})  # a new split (e.g. after a restart): same answers
    assert all(split.pick_sticky(k) == v and again.pick_sticky(k) == v for k, v in first.items())
    on_2 = sum(v == "2" for v in first.values())
    sd = math.sqrt(len(keys) * 0.2 * 0.8)
    assert abs(on_2 - 0.2 * len(keys)) < _Z * sd


def test_sticky_assignments_are_pinned_across_releases() -> None:
    # During a rolling update, gateways of two releases serve one fleet: a key must get the
    # same version from both. These assignments change only on purpose (say so then).
    split = TrafficSplit({1: 50, 2: 30, 3: 20})
    got = "".join(split.pick_sticky(k) for k in _keys(12))
    assert got == "311113221211"


def test_scaling_every_weight_moves_no_key() -> None:
    keys = _keys(5_000)
    a, b = TrafficSplit({1: 9, 2: 1}), TrafficSplit({1: 90, 2: 10})
    assert all(a.pick_sticky(k) == b.pick_sticky(k) for k in keys)
    # Weights below 1 (shares given as fractions) are scaled weights too.
    c = TrafficSplit({1: 0.009, 2: 0.001})
    assert all(a.pick_sticky(k) == c.pick_sticky(k) for k in keys)


def test_raising_the_canary_moves_keys_only_towards_it() -> None:
    keys = _keys(20_000)
    n = len(keys)
    previous = {k: "1" for k in keys}
    previous_share = 0.0
    for canary in (1, 5, 10, 20, 50, 90, 100):
        split = TrafficSplit({1: 100 - canary, 2: canary})
        now = {k: split.pick_sticky(k) for k in keys}
        moved = [k for k in keys if now[k] != previous[k]]
        assert all(previous[k] == "1" and now[k] == "2" for k in moved), canary
        # About (new share - old share) of all keys move, no more (binomial bound).
        p = canary / 100 - previous_share
        assert abs(len(moved) - n * p) < _Z * math.sqrt(n * p * (1 - p)) + 1, (canary, len(moved))
        previous, previous_share = now, canary / 100


def test_raising_one_of_three_versions_moves_keys_only_to_it() -> None:
    keys = _keys(10_000)
    before = TrafficSplit({1: 60, 2: 30, 3: 10})
    after = TrafficSplit({1: 60, 2: 30, 3: 40})
    changed = [(before.pick_sticky(k), after.pick_sticky(k)) for k in keys]
    moved = [(a, b) for a, b in changed if a != b]
    assert moved and all(b == "3" for _, b in moved)
    # Both other versions give up keys in proportion to their weight: 1 about twice 2.
    from_1 = sum(a == "1" for a, _ in moved)
    from_2 = sum(a == "2" for a, _ in moved)
    assert 1.6 < from_1 / from_2 < 2.5


def test_route_picks_by_header_or_at_random() -> None:
    route = ModelRoute(
        "digits",
        RouteConfig.model_validate({"split": {1: 50, 2: 50}, "sticky": {"header": "X-User"}}),
    )
    assert route.header == "x-user"
    assert {route.pick({"x-user": "alice"}) for _ in range(50)} == {
        route.split.pick_sticky("alice")
    }
    assert {route.pick({}) for _ in range(200)} == {"1", "2"}
    assert route.pick_by_parameter({"user": "alice"}) is None


def test_route_picks_by_parameter() -> None:
    route = ModelRoute(
        "digits",
        RouteConfig.model_validate({"split": {"1": 50, "2": 50}, "sticky": {"parameter": "user"}}),
    )
    assert route.pick_by_parameter({"user": 42}) == route.split.pick_sticky("42")
    assert route.pick_by_parameter({}) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("routes: {d: {split: {1: 50}, weights: 2}}", "routes.d.weights: unknown key"),
        ("routes: {d: {split: {1: -1, 2: 5}}}", "weights must be between 0 and 1000000000"),
        # Each finite, but their sum is not: every share would be 0.
        ("routes: {d: {split: {1: 1e308, 2: 1e308}}}", "weights must be between 0 and 1000000000"),
        ("routes: {d: {split: {1: .nan, 2: 1}}}", "weights must be between 0 and 1000000000"),
        ("routes: {d: {split: {1: 0}}}", "at least one version needs a positive weight"),
        ("routes: {d: {split: {0: 1}}}", "versions are numbers from 1"),
        (
            "routes: {d: {split: {1: 1}, sticky: {header: a, parameter: b}}}",
            "exactly one of header or parameter",
        ),
        ("routes: {d: {split: {1: 1}, shadow: {version: 2, percent: 120}}}", "routes.d.shadow"),
        ("routes: {d: {split: {1: 1}, rollout: {max_p99_ratio: 0.5}}}", "rollout.max_p99_ratio"),
        ("routes: {d: {split: {1: 1}, rollout: {p99_breaches: 0}}}", "rollout.p99_breaches"),
        ("routes: {'../x': {split: {1: 1}}}", "routes"),
    ],
)
def test_bad_routes_are_refused_with_their_path(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "fermion.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(path)


def test_routes_section_loads(tmp_path: Path) -> None:
    path = tmp_path / "fermion.yaml"
    path.write_text(
        "routes:\n  digits:\n    split: {'1': 90, '2': 10}\n    sticky: {header: x-user-id}\n"
        "    shadow: {version: 2, percent: 10}\n    rollout: {min_requests: 50}\n"
    )
    route = load_config(path).routes["digits"]
    assert route.split == {1: 90.0, 2: 10.0}
    assert route.sticky is not None and route.sticky.header == "x-user-id"
    assert route.shadow is not None and route.shadow.percent == 10.0
    assert route.rollout.min_requests == 50
