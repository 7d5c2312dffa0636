"""Reading a capture back as a replay schedule (what the gateway's capture writes)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from loadtest.replay import load_capture, parse_speed, read_capture
from loadtest.transport import load_transport


def record(ts: float, rid: str, **extra: Any) -> dict[str, Any]:
    return {
        "ts": ts,
        "path": "/v2/models/digits/infer",
        "query": "",
        "headers": [
            ["host", "gw:8000"],
            ["content-length", "2"],
            ["content-type", "application/json"],
            ["x-request-id", rid],
            ["authorization", "Bearer should-not-be-here"],
        ],
        "body": "{}",
        **extra,
    }


def write(path: Path, records: list[dict[str, Any]], junk: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + junk)
    return path


def test_a_capture_becomes_a_schedule_in_arrival_order(tmp_path: Path) -> None:
    binary = base64.b64encode(b"\x00\x01binary").decode()
    first = write(tmp_path / "a.jsonl", [record(100.5, "r1"), record(101.5, "r3")])
    write(
        tmp_path / "b.jsonl",
        [record(100.0, "r0"), record(101.0, "r2", body=None, body_b64=binary)],
        junk="not json\n",
    )
    entries, length = load_capture(tmp_path, speed=2.0)
    assert [t for t, _ in entries] == [0.0, 0.25, 0.5, 0.75] and length == 0.75
    assert [dict(c.headers)["x-request-id"] for _, c in entries] == ["r0", "r1", "r2", "r3"]
    call = entries[0][1]
    assert call.path == "/v2/models/digits/infer" and call.body == b"{}"
    assert dict(call.headers) == {"content-type": "application/json", "x-request-id": "r0"}
    assert entries[2][1].body == b"\x00\x01binary"
    assert read_capture(tmp_path).skipped == {"not JSON": 1}
    assert len(load_capture(first)[0]) == 2


def test_what_cannot_be_replayed_is_counted_and_nothing_is_an_error(tmp_path: Path) -> None:
    cut = record(1.0, "r0", body=None, body_truncated=True, body_bytes=5_000_000)
    capture = read_capture(write(tmp_path / "c.jsonl", [cut, {"path": "/x"}, record(2, "r1")]))
    assert len(capture.records) == 1
    assert capture.skipped == {
        "body over the capture's max_body_bytes": 1,
        "no arrival time": 1,
    }
    with pytest.raises(ValueError, match="nothing to replay"):
        load_capture(write(tmp_path / "d.jsonl", [cut]))
    with pytest.raises(ValueError, match="not found"):
        load_capture(tmp_path / "missing.jsonl")


def test_speeds_and_protocols() -> None:
    assert parse_speed("2x") == 2.0 and parse_speed("0.5") == 0.5
    for bad in ("0x", "fast", "-1x"):
        with pytest.raises(ValueError, match="invalid speed"):
            parse_speed(bad)
    assert load_transport("http").__name__ == "HttpTransport"
    with pytest.raises(ValueError, match=r"unknown protocol 'carrier-pigeon' \(one of http"):
        load_transport("carrier-pigeon")
