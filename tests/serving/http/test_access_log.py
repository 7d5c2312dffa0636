"""The JSON access log: one line per request with request id, trace id, key name, model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from model_store.store import ModelStore
from serving.auth import create_key
from serving.config import AuthConfig, FermionConfig, ServerConfig
from serving.http.middleware.access_log import ACCESS_LOGGER
from serving.observability import tracing
from tests.helpers.inprocess import digits_body, serve_in_process


async def test_access_log_line(
    demo_store: ModelStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys.json"
    key = create_key(keys, "ci-bot", ["infer:digits"])
    config = FermionConfig(server=ServerConfig(access_log=True), auth=AuthConfig(keys_file=keys))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {
        "Authorization": f"Bearer {key}",
        "x-request-id": "req-42",
        "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
    }
    try:
        async with serve_in_process(config, demo_store, span_exporter=InMemorySpanExporter()) as gw:
            with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
                r = await gw.client.post(
                    "/v2/models/digits/versions/1/infer", json=digits_body(), headers=headers
                )
                assert r.status_code == 200
                r = await gw.client.get("/v2/models/digits", headers={"x-api-key": "nope"})
                assert r.status_code == 401
    finally:
        tracing.shutdown()
    lines = [rec.getMessage() for rec in caplog.records if rec.name == ACCESS_LOGGER]
    assert len(lines) == 2
    assert all(key not in line for line in lines)
    ok, denied = (json.loads(line) for line in lines)
    assert ok["request_id"] == "req-42"
    assert ok["trace_id"] == trace_id
    assert ok["key"] == "ci-bot"
    assert (ok["model"], ok["version"], ok["status"]) == ("digits", "1", 200)
    assert ok["latency_ms"] > 0
    assert (denied["status"], denied["key"], denied["model"]) == (401, None, None)
    assert denied["request_id"] and denied["request_id"] != "req-42"
