"""Payload capture: a share of inference requests, with answers and timings, written to
rotating JSONL files without credentials."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import orjson

from model_store.store import ModelStore
from serving.auth import create_key
from serving.config import AuthConfig, CaptureConfig, FermionConfig
from tests.helpers.inprocess import digits_body, serve_in_process


def records(folder: Path) -> list[dict[str, Any]]:
    out = []
    for file in sorted(folder.glob("capture-*.jsonl")):
        out += [json.loads(line) for line in file.read_text().splitlines()]
    return sorted(out, key=lambda r: r["ts"])


def metric(text: str, outcome: str) -> float:
    prefix = f'fermion_capture_records_total{{outcome="{outcome}"}} '
    line = next(x for x in text.splitlines() if x.startswith(prefix))
    return float(line.removeprefix(prefix))


async def test_a_capture_keeps_what_a_replay_needs_and_no_credentials(
    demo_store: ModelStore, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    key = create_key(keys, "ci-bot", ["infer:digits", "read"])
    capture = CaptureConfig(percent=100, dir=tmp_path / "capture")
    config = FermionConfig(auth=AuthConfig(keys_file=keys), capture=capture)
    body = orjson.dumps(digits_body(rows=2))
    async with serve_in_process(config, demo_store) as gw:
        auth = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        for i in range(3):
            r = await gw.client.post(
                "/v2/models/digits/versions/1/infer",
                content=body,
                headers={**auth, "x-request-id": f"r{i}", "cookie": "session=secret"},
            )
            assert r.status_code == 200
        refused = await gw.client.post("/v2/models/digits/infer", content=body)
        assert refused.status_code == 401
        assert (await gw.client.get("/v2/models/digits", headers=auth)).status_code == 200
        answers = r.json()
        deadline = time.monotonic() + 10
        while metric((await gw.client.get("/metrics", headers=auth)).text, "written") < 4:
            assert time.monotonic() < deadline, "the capture's writer never wrote"
            await asyncio.sleep(0.02)
    text = "".join(f.read_text() for f in (tmp_path / "capture").iterdir())
    assert key not in text and "session=secret" not in text
    got = records(tmp_path / "capture")
    assert [g["status"] for g in got] == [200, 200, 200, 401]  # inference requests only
    first = got[0]
    assert first["request_id"] == "r0" and first["path"] == "/v2/models/digits/versions/1/infer"
    headers = dict(first["headers"])
    assert "authorization" not in headers and "cookie" not in headers
    assert headers["x-request-id"] == "r0" and headers["content-type"] == "application/json"
    assert first["body"].encode() == body and first["body_bytes"] == len(body)
    assert json.loads(got[2]["response"]) == answers
    assert (first["model"], first["version"]) == ("digits", "1")
    assert first["latency_ms"] > 0
    assert first["ts"] <= got[1]["ts"] <= got[2]["ts"]
    assert json.loads(got[3]["response"])["error"]  # a refusal is captured with its answer


async def test_a_share_is_captured(demo_store: ModelStore, tmp_path: Path) -> None:
    config = FermionConfig(capture=CaptureConfig(percent=25, dir=tmp_path))
    async with serve_in_process(config, demo_store) as gw:
        for _ in range(100):
            r = await gw.client.post("/v2/models/digits/infer", json=digits_body())
            assert r.status_code == 200
    # 25 expected; 5 and 50 are 4.6 standard deviations away
    assert 5 <= len(records(tmp_path)) <= 50


async def test_files_rotate_and_the_oldest_go(demo_store: ModelStore, tmp_path: Path) -> None:
    capture = CaptureConfig(
        percent=100, dir=tmp_path, max_file_bytes=4096, max_files=3, max_body_bytes=100
    )
    async with serve_in_process(FermionConfig(capture=capture), demo_store) as gw:
        for i in range(60):
            r = await gw.client.post(
                "/v2/models/digits/infer", json=digits_body(), headers={"x-request-id": f"r{i}"}
            )
            assert r.status_code == 200
    files = sorted(tmp_path.glob("capture-*.jsonl"))
    assert len(files) == 3
    for file in files:
        lines = file.read_bytes().splitlines(keepends=True)
        assert sum(map(len, lines[:-1])) < 4096  # a file ends after the record that fills it
    kept = records(tmp_path)
    assert [r["request_id"] for r in kept] == [f"r{i}" for i in range(60 - len(kept), 60)]
    assert all(r["body_truncated"] and "body" not in r for r in kept)  # over max_body_bytes
    assert all(r["body_bytes"] > 100 and r["status"] == 200 for r in kept)
