"""Progress lines of a build: one per phase (train epochs, export, compile and parity per
target, publish), each with its time, so that a long build is never silent."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["Progress", "timed"]

#: Receives one line per finished phase (e.g. printed to stderr by the CLI).
Progress = Callable[[str], None]


@contextmanager
def timed(progress: Progress | None, what: str) -> Iterator[dict[str, str]]:
    """Report ``what`` and its time once the block finishes (the block may add a detail).

    Nothing is reported when ``progress`` is None or the block raises.
    """
    detail: dict[str, str] = {}
    started = time.perf_counter()
    yield detail
    if progress is not None:
        extra = f": {detail['detail']}" if "detail" in detail else ""
        progress(f"{what}{extra} ({time.perf_counter() - started:.2f} s)")
