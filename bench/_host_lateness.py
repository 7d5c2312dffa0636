"""How late a sleeping process on this machine wakes: a witness for slow windows.

On the shared 2-core VM, some c=1 cells of ``tail_bench`` have a p99 three to six
times their neighbours' while their p90 stays put, on whichever server happens to
be measured (one run had a whole pass of two gateways so). Such a window is the
machine's, not the server's; this module lets a run say which cells fell in one.

``python -m bench._host_lateness OUT`` sleeps 1 ms at a time and records, per
wake-up, the monotonic clock (the same clock in every process of this machine) and
how much later than asked it woke; on SIGTERM or SIGINT it writes them to OUT as
pairs of float64. It adds about a thousand wake-ups a second to the machine, so it
runs only when asked (``tail_bench --host-lateness``).
"""

from __future__ import annotations

import array
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import numpy as np

__all__ = ["Lateness", "host_lateness", "main"]

#: Each sleep asked for, in seconds.
_PERIOD = 0.001


@dataclass(frozen=True)
class Lateness:
    """The wake-ups a sleeper recorded: monotonic times and lateness (seconds)."""

    times: np.ndarray
    late: np.ndarray

    def window(self, start: float, end: float) -> tuple[float, int] | None:
        """The p99 lateness in ms between two monotonic times, and the wake-ups more
        than 1 ms late; None when the sleeper recorded nothing in between."""
        inside = self.late[(self.times >= start) & (self.times < end)]
        if not inside.size:
            return None
        return float(np.percentile(inside, 99) * 1e3), int((inside > 1e-3).sum())

    @classmethod
    def read(cls, path: Path) -> Lateness:
        pairs = np.fromfile(path, dtype=np.float64).reshape(-1, 2)
        return cls(pairs[:, 0], pairs[:, 1])


@contextmanager
def host_lateness(out: Path) -> Iterator[Path]:
    """The sleeper running in its own process until the block ends; then ``out``
    holds its records (``Lateness.read``)."""
    process = subprocess.Popen([sys.executable, "-m", "bench._host_lateness", str(out)])
    try:
        yield out
    finally:
        process.terminate()
        process.wait(timeout=30)
    if process.returncode != 0 or not out.exists():
        raise RuntimeError(f"the host lateness sleeper failed ({process.returncode})")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench._host_lateness OUT", file=sys.stderr)
        return 2
    records = array.array("d")
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        asked = time.monotonic()
        time.sleep(_PERIOD)
        woke = time.monotonic()
        records.append(woke)
        records.append(woke - asked - _PERIOD)
    with Path(args[0]).open("wb") as f:
        records.tofile(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
