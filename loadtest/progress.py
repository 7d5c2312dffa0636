"""The live progress line of a run: rate, p50/p99 and errors so far, once a second.

On a terminal the line is rewritten in place; in a log (not a TTY) a line is printed
every few seconds instead, so a CI log stays short.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TextIO

from loadtest.openloop import Tick, hist_percentile
from loadtest.rates import format_rate
from loadtest.summary import number

__all__ = ["PROGRESS_PREFIX", "Progress", "ProgressLine"]

#: Marks a progress line (JSON of ``Progress``) in locust's output.
PROGRESS_PREFIX: Final = b"FERMION_PROGRESS "
_LOG_EVERY_S: Final = 5.0


@dataclass(frozen=True)
class Progress:
    """One second of a run as the progress line shows it."""

    elapsed_s: float
    rate: float
    p50_ms: float | None
    p99_ms: float | None
    requests: int
    errors: int
    target: float | None = None
    in_flight: int | None = None
    users: int | None = None

    def line(self) -> str:
        """``12s  1998/s (target 2000/s)  p50 1.2ms  p99 4.1ms  errors 0 (0%)``."""
        parts = [f"{self.elapsed_s:4.0f}s", format_rate(self.rate)]
        if self.target is not None:
            parts[-1] += f" (target {format_rate(self.target)})"
        for name, value in (("p50", self.p50_ms), ("p99", self.p99_ms)):
            parts.append(f"{name} {number(value)}ms" if value is not None else f"{name} -")
        share = self.errors / self.requests * 100 if self.requests else 0.0
        parts.append(f"errors {self.errors} ({share:.3g}%)")
        if self.in_flight is not None:
            parts.append(f"in flight {self.in_flight}")
        if self.users is not None:
            parts.append(f"users {self.users}")
        return "  ".join(parts)


class ProgressLine:
    """Turns each second's figures into the progress line on ``stream``."""

    def __init__(
        self,
        stream: TextIO | None = None,
        target: Callable[[float], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._target = target
        self._clock = clock
        self._last_log = -_LOG_EVERY_S
        self._requests = 0
        self._errors = 0
        self._shown = False

    def tick(self, tick: Tick) -> None:
        """Show one second of an open-loop run (all workers' figures merged)."""
        self._requests += tick.done
        self._errors += tick.errors
        elapsed = float(tick.second + 1)
        self.show(
            Progress(
                elapsed_s=elapsed,
                rate=float(tick.done),
                p50_ms=hist_percentile(tick.latency, 0.5),
                p99_ms=hist_percentile(tick.latency, 0.99),
                requests=self._requests,
                errors=self._errors,
                target=self._target(tick.second + 0.5) if self._target else None,
                in_flight=tick.in_flight,
            )
        )

    def show(self, progress: Progress) -> None:
        """Print ``progress`` (in place on a terminal; every few seconds in a log)."""
        if self._tty:
            self._stream.write("\r\033[K" + progress.line())
            self._shown = True
        else:
            now = self._clock()
            if now - self._last_log < _LOG_EVERY_S:
                return
            self._last_log = now
            self._stream.write(progress.line() + "\n")
        self._stream.flush()

    def close(self) -> None:
        """End the line in place (on a terminal) before other output."""
        if self._tty and self._shown:
            self._stream.write("\n")
            self._stream.flush()
            self._shown = False
