"""Load profiles: how many users run at each moment of a test of a given length.

Pure functions, used by the locust shape class (``loadtest/shapefile.py``) and tested
without locust.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["SHAPES", "target"]

#: The shapes ``--shape`` accepts.
SHAPES: Final = ("steady", "ramp", "step", "spike")

#: The spike runs through this part of the test (as fractions of its length).
_SPIKE: Final = (0.4, 0.6)


def target(
    shape: str, elapsed: float, users: int, spawn_rate: float, duration: float, steps: int = 4
) -> tuple[int, float] | None:
    """The ``(users, spawn rate)`` to run ``elapsed`` seconds in, or None once it is over.

    ``steady`` runs ``users`` throughout; ``ramp`` grows linearly from 1 to ``users``;
    ``step`` climbs to ``users`` in ``steps`` equal plateaus; ``spike`` runs a quarter of
    ``users`` and jumps to all of them (spawned at once) for the middle fifth of the test.
    """
    if elapsed >= duration:
        return None
    frac = elapsed / duration
    if shape == "steady":
        return users, spawn_rate
    if shape == "ramp":
        return max(1, math.ceil(users * frac)), max(spawn_rate, users / duration)
    if shape == "step":
        steps = max(1, min(steps, users))
        step = min(int(frac * steps), steps - 1) + 1
        return max(1, round(users * step / steps)), spawn_rate
    if shape == "spike":
        if _SPIKE[0] <= frac < _SPIKE[1]:
            return users, max(spawn_rate, float(users))
        return max(1, users // 4), max(spawn_rate, float(users))
    raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
