"""Locust load shape for ``fermion loadtest``: steady, ramp, step or spike.

Add it to a locust run beside the scenario (``-f loadtest/locustfile.py,loadtest/shapefile.py``)
with ``--shape NAME`` and ``--duration``; it reads ``--users`` and ``--spawn-rate`` and ends
the test when the duration is over (locust's own ``--run-time`` is not used: it quits
without the graceful stop that the report's final counts need).
"""

from __future__ import annotations

import time
from typing import Any

from locust import LoadTestShape, events

from loadtest.profiles import SHAPES, target
from serving.durations import parse_duration

__all__ = ["FermionShape"]


def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("fermion shape")
    group.add_argument("--shape", default="steady", choices=SHAPES, help="load profile")
    group.add_argument("--steps", type=int, default=4, help="plateaus of --shape step")
    group.add_argument("--duration", default="60s", help="length of the test (e.g. 90s, 2m)")


class FermionShape(LoadTestShape):
    """Users over time following ``--shape``, for ``--duration``."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        opts = self.runner.environment.parsed_options
        if opts is None:
            return None
        return target(
            opts.shape,
            time.perf_counter() - self.start_time,
            int(opts.num_users or 1),
            float(opts.spawn_rate or 1.0),
            parse_duration(str(opts.duration)),
            int(opts.steps),
        )


_hook: Any = events.init_command_line_parser
_hook.add_listener(_add_arguments)
