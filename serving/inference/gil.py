"""The GIL's switch interval: how long an inference thread waits for the event loop.

An inference thread runs a batch with the GIL released (ONNX Runtime and torch let
go of it while they compute) and needs it back to return the batch's outputs, split
them and start the next batch. Under load the event loop holds the GIL
almost all the time, and CPython makes a thread that asks for it wait a whole switch
interval (5 ms by default) before the holder is told to let go. The batch is done,
but its answers, and the next batch, wait up to 5 ms behind Python code that has
nothing to do with them: at saturation every batch pays it, twice.

``server.gil_switch_interval_ms`` sets a shorter interval for the gateway process
(``switch_interval`` around the server's run). Measured on a 2-core VM under
``wrk -c64`` (README, Tail latency, thirteenth round): ONNX Runtime's run took 2.7 ms
a batch beyond its thread's own CPU time on average (a tenth of the batches over 7
ms) at 5 ms, 1.6 ms at 0.2 ms (``bench.tail_bench --probe``), and binary-body
throughput rose by 11-25%.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

__all__ = ["switch_interval"]


@contextlib.contextmanager
def switch_interval(seconds: float | None) -> Iterator[None]:
    """Set the interpreter's switch interval for the block, then restore the one before.

    ``None`` leaves Python's own alone.
    """
    if seconds is None:
        yield
        return
    if not seconds > 0:
        raise ValueError(f"a switch interval must be above 0 seconds, not {seconds!r}")
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)
