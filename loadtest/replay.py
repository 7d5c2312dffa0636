"""Replay captured traffic: the gateway's capture files back as a schedule of requests.

The gateway's payload capture (``capture:`` in its configuration) writes one JSON line
per sampled inference request: its arrival time ``ts``, path, headers (credentials
left out), body, and the answer it got. A replay sends the same requests, in the same
order, with the same gaps between arrivals (divided by ``--speed``), through the
open-loop engine: each request's latency runs from its scheduled time.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from loadtest.transport import Call

__all__ = ["Capture", "load_capture", "parse_speed", "read_capture"]

#: Headers that belong to one connection or to the client's credentials: never replayed.
_NOT_REPLAYED: Final = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "authorization",
        "proxy-authorization",
        "cookie",
    }
)
_SPEED = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*x?\s*$")


def parse_speed(text: str) -> float:
    """``"2x"``, ``"2"`` or ``"0.5x"`` as a factor (ValueError if not positive)."""
    m = _SPEED.match(text)
    if m is None or float(m[1]) <= 0:
        raise ValueError(f"invalid speed {text!r} (e.g. 1x, 2x, 0.5x)")
    return float(m[1])


@dataclass
class Capture:
    """Captured requests in arrival order, and what could not be replayed (by reason)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def span_s(self) -> float:
        """Seconds from the first arrival to the last."""
        if not self.records:
            return 0.0
        return float(self.records[-1]["ts"]) - float(self.records[0]["ts"])


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise ValueError(f"no capture files (*.jsonl) in {path}")
        return files
    if not path.is_file():
        raise ValueError(f"capture {path} not found")
    return [path]


def _body(record: dict[str, Any]) -> bytes | None:
    if isinstance(record.get("body"), str):
        return str(record["body"]).encode("utf-8")
    if isinstance(record.get("body_b64"), str):
        try:
            return base64.b64decode(record["body_b64"], validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


def read_capture(path: Path) -> Capture:
    """The records of a capture file, or of every ``*.jsonl`` in a folder, by arrival."""
    capture = Capture()
    for file in _files(path):
        with file.open("rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    capture.skipped["not JSON"] += 1
                    continue
                if not isinstance(record, dict) or not isinstance(record.get("ts"), int | float):
                    capture.skipped["no arrival time"] += 1
                elif not isinstance(record.get("path"), str):
                    capture.skipped["no path"] += 1
                elif record.get("body_truncated"):
                    capture.skipped["body over the capture's max_body_bytes"] += 1
                elif _body(record) is None:
                    capture.skipped["no body"] += 1
                else:
                    capture.records.append(record)
    capture.records.sort(key=lambda r: float(r["ts"]))
    return capture


def _call(record: dict[str, Any]) -> Call:
    path = str(record["path"])
    if record.get("query"):
        path += "?" + str(record["query"])
    headers = tuple(
        (str(k).lower(), str(v))
        for k, v in record.get("headers") or []
        if str(k).lower() not in _NOT_REPLAYED
    )
    body = _body(record)
    assert body is not None
    return Call(path, body, headers)


def load_capture(path: Path, speed: float = 1.0) -> tuple[list[tuple[float, Call]], float]:
    """The replay schedule of ``path``: ``(seconds from the first arrival / speed, call)``
    for each request in arrival order, and the schedule's length."""
    capture = read_capture(path)
    if not capture.records:
        raise ValueError(f"nothing to replay in {path}")
    first = float(capture.records[0]["ts"])
    entries = [((float(r["ts"]) - first) / speed, _call(r)) for r in capture.records]
    return entries, entries[-1][0]
