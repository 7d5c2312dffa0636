"""The inference path (``serving.http.infer_path``): every gateway feature applies to an
inference request without the middleware chain, in the chain's order."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from model_store.store import ModelStore
from serving.auth import create_key
from serving.config import FermionConfig
from serving.http.middleware.access_log import ACCESS_LOGGER
from serving.observability import tracing
from tests.helpers.inprocess import digits_body, serve_in_process
from tests.helpers.prom import metric_value


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]


async def test_one_inference_request_gets_id_auth_span_access_line_and_gzip(
    demo_store: ModelStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys.json"
    key = create_key(keys, "ci-bot", ["infer:digits"])
    config = FermionConfig.model_validate(
        {
            "server": {"access_log": True},
            "auth": {"keys_file": str(keys)},
            "tracing": {"exporter": "console", "sample_ratio": 1.0},
        }
    )
    exporter = InMemorySpanExporter()
    headers = {"x-api-key": key, "x-request-id": "req-7", "accept-encoding": "gzip"}
    try:
        async with serve_in_process(config, demo_store, span_exporter=exporter) as gw:
            with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
                ok = await gw.client.post(
                    "/v2/models/digits/versions/1/infer", json=digits_body(rows=40), headers=headers
                )
                denied = await gw.client.post(
                    "/v2/models/digits/infer", json=digits_body(), headers={"x-api-key": "no"}
                )
    finally:
        tracing.shutdown()
    assert ok.status_code == 200, ok.text
    assert ok.headers["x-request-id"] == "req-7"
    assert ok.headers["content-encoding"] == "gzip"
    assert ok.headers["fermion-model-version"] == "1"
    assert len(ok.json()["outputs"][0]["data"]) == 40 * 10  # httpx inflated it
    assert denied.status_code == 401
    assert denied.headers["www-authenticate"] == "Bearer"
    assert denied.headers["x-request-id"] and denied.headers["x-request-id"] != "req-7"
    assert "content-encoding" not in denied.headers
    line_ok, line_denied = _access_lines(caplog)
    assert (line_ok["request_id"], line_ok["key"], line_ok["status"]) == ("req-7", "ci-bot", 200)
    assert (line_ok["model"], line_ok["version"]) == ("digits", "1")
    assert (line_denied["status"], line_denied["key"]) == (401, None)
    servers = [s for s in exporter.get_finished_spans() if s.name.startswith("POST")]
    assert [s.name for s in servers] == [
        "POST /v2/models/{model}/versions/{version}/infer",
        "POST /v2/models/{model}/infer",
    ]
    first, second = servers
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["http.response.status_code"] == 200
    assert first.attributes["fermion.request_id"] == "req-7"
    assert format(first.context.trace_id, "032x") == line_ok["trace_id"]
    assert second.attributes["http.response.status_code"] == 401
    assert second.attributes["error.type"] == "401"
    # The request's own work (queue, batch) hangs under its server span.
    children = [s for s in exporter.get_finished_spans() if s.parent is not None]
    assert any(s.parent.span_id == first.context.span_id for s in children if s.parent)


async def test_another_method_on_an_infer_path_is_admitted_then_answered_405(
    demo_store: ModelStore, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    key = create_key(keys, "reader", ["read"])
    config = FermionConfig.model_validate({"auth": {"keys_file": str(keys)}})
    async with serve_in_process(config, demo_store) as gw:
        assert (await gw.client.get("/v2/models/digits/infer")).status_code == 401
        for method in ("GET", "PUT", "DELETE"):
            r = await gw.client.request(
                method,
                "/v2/models/digits/versions/1/infer",
                headers={"x-api-key": key, "x-request-id": f"m-{method}"},
            )
            assert r.status_code == 405, r.text
            assert r.headers["allow"] == "POST"
            assert r.headers["x-request-id"] == f"m-{method}"
            assert "POST" in r.json()["error"]
        assert gw.computed_rows() == 0


async def test_rate_limit_and_body_limit_refuse_inference_and_are_counted(
    demo_store: ModelStore,
) -> None:
    config = FermionConfig.model_validate(
        {
            "server": {"max_body_bytes": 8192},
            "limits": {"rate_limits": [{"rate": 0.001, "burst": 3}]},
        }
    )

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(data), 1024):
            yield data[i : i + 1024]

    async with serve_in_process(config, demo_store) as gw:
        small = orjson.dumps(digits_body())
        assert len(small) < 8192
        r = await gw.client.post("/v2/models/digits/infer", content=small)
        assert r.status_code == 200, r.text
        # Declared over the limit: refused from its Content-Length, connection closed.
        r = await gw.client.post("/v2/models/digits/infer", content=b"{" + b" " * 9000 + b"}")
        assert r.status_code == 413
        assert r.headers["connection"] == "close"
        # No length declared: refused once the body read passes the limit.
        stream = chunks(orjson.dumps(digits_body(rows=3)))
        r = await gw.client.post("/v2/models/digits/infer", content=stream)
        assert r.status_code == 413, r.text
        assert "over the limit of 8192 bytes" in r.json()["error"]
        # The bucket held three; every request above took one.
        r = await gw.client.post("/v2/models/digits/infer", content=small)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-request-id"]
        assert gw.computed_rows() == 1
        text = (await gw.client.get("/metrics")).text
    rejected = "fermion_rejected_requests_total"
    assert metric_value(text, rejected, model="digits", reason="too_large") == 2
    assert metric_value(text, rejected, model="digits", reason="rate_limited") == 1
    requests = "fermion_requests_total"
    # Refused at the door (no version yet), and by version 2 while it read the body.
    assert metric_value(text, requests, model="digits", version="", status="413") == 1
    assert metric_value(text, requests, model="digits", version="2", status="413") == 1
    assert metric_value(text, requests, model="digits", version="", status="429") == 1


async def test_a_path_that_only_looks_like_inference_goes_to_the_router(
    demo_store: ModelStore,
) -> None:
    async with serve_in_process(FermionConfig(), demo_store) as gw:
        for path in ("/v2/models//infer", "/v2/models/digits/versions//infer", "/x/infer"):
            r = await gw.client.post(path, json={})
            assert r.status_code == 404, path
            assert r.json()["error"] == f"no route for {path}"
