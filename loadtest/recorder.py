"""What the simulated users measured, per second: latency histograms per served version,
errors by status and message, and the number of running users.

A ``Recorder`` lives in every locust process; workers drain theirs to the master, which
merges them. Its serialized form is plain JSON, read back by the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["FAILED", "Recorder", "latency_bucket"]

#: The histogram key under which failed requests' latencies are kept.
FAILED: Final = "!"


def latency_bucket(ms: float) -> int:
    """``ms`` in microseconds rounded to three significant digits (under 0.5% error)."""
    us = int(ms * 1000.0 + 0.5)
    if us < 1000:
        return max(us, 0)
    scale = int(10 ** (len(str(us)) - 3))
    return (us + scale // 2) // scale * scale


@dataclass
class _Second:
    latency: dict[str, dict[int, int]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    users: int | None = None


class Recorder:
    """Per-second latency histograms (by version), error counts and user counts."""

    def __init__(self) -> None:
        self._seconds: dict[int, _Second] = {}
        self.start: float | None = None
        self.end: float | None = None

    def _second(self, t: float) -> _Second:
        key = int(t)
        sec = self._seconds.get(key)
        if sec is None:
            sec = self._seconds[key] = _Second()
        return sec

    def record(self, end: float, ms: float, version: str | None, error: str | None) -> None:
        """One response that finished at ``end`` (epoch seconds) after ``ms`` milliseconds.

        ``version`` is the version that served it (None when the response did not say);
        ``error`` is ``"<status> <message>"`` for a failed request, else None.
        """
        begin = end - ms / 1000.0
        if self.start is None or begin < self.start:
            self.start = begin
        if self.end is None or end > self.end:
            self.end = end
        sec = self._second(end)
        key = FAILED if error is not None else (version or "?")
        hist = sec.latency.get(key)
        if hist is None:
            hist = sec.latency[key] = {}
        bucket = latency_bucket(ms)
        hist[bucket] = hist.get(bucket, 0) + 1
        if error is not None:
            sec.errors[error] = sec.errors.get(error, 0) + 1

    def sample_users(self, t: float, users: int) -> None:
        """The number of running users at time ``t``."""
        self._second(t).users = users

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy."""
        seconds: dict[str, Any] = {}
        for key, sec in sorted(self._seconds.items()):
            row: dict[str, Any] = {}
            if sec.latency:
                row["latency"] = {
                    v: {str(b): n for b, n in sorted(h.items())} for v, h in sec.latency.items()
                }
            if sec.errors:
                row["errors"] = dict(sec.errors)
            if sec.users is not None:
                row["users"] = sec.users
            seconds[str(key)] = row
        return {"start": self.start, "end": self.end, "seconds": seconds}

    def drain(self) -> dict[str, Any]:
        """``to_dict()``, then forget everything (what a worker sends to its master)."""
        data = self.to_dict()
        self._seconds = {}
        self.start = self.end = None
        return data

    def merge(self, data: dict[str, Any]) -> None:
        """Add what another recorder drained (``to_dict()`` form)."""
        start, end = data.get("start"), data.get("end")
        if start is not None and (self.start is None or start < self.start):
            self.start = start
        if end is not None and (self.end is None or end > self.end):
            self.end = end
        for key, row in data.get("seconds", {}).items():
            sec = self._second(int(key))
            for version, hist in row.get("latency", {}).items():
                mine = sec.latency.setdefault(version, {})
                for bucket, n in hist.items():
                    b = int(bucket)
                    mine[b] = mine.get(b, 0) + int(n)
            for label, n in row.get("errors", {}).items():
                sec.errors[label] = sec.errors.get(label, 0) + int(n)
            if "users" in row:
                sec.users = (sec.users or 0) + int(row["users"])

    @property
    def requests(self) -> int:
        """Responses recorded so far (failed ones included)."""
        return sum(
            n for s in self._seconds.values() for h in s.latency.values() for n in h.values()
        )
