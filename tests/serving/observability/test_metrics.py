"""Prometheus metrics change as expected after a known sequence of requests."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from model_store.store import ModelStore
from serving.auth import create_key
from serving.config import AuthConfig, FermionConfig, MetricsConfig
from serving.observability.metrics import GatewayMetrics
from tests.helpers.inprocess import digits_body, serve_in_process

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metric_values_after_known_requests(demo_store: ModelStore, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    key = create_key(keys, "ci", ["infer:*", "read"])
    auth = {"x-api-key": key}
    config = FermionConfig(auth=AuthConfig(keys_file=keys))
    async with serve_in_process(config, demo_store) as gw:
        client = gw.client
        for _ in range(3):
            r = await client.post("/v2/models/digits/infer", json=digits_body(), headers=auth)
            assert r.status_code == 200
        r = await client.post("/v2/models/digits/infer", json=digits_body(rows=4), headers=auth)
        assert r.status_code == 200
        r = await client.post(
            "/v2/models/digits/versions/1/infer", json=digits_body(), headers=auth
        )
        assert r.status_code == 200
        bad = digits_body()
        bad["inputs"][0]["datatype"] = "INT8"
        assert (
            await client.post("/v2/models/digits/infer", json=bad, headers=auth)
        ).status_code == 400
        assert (await client.post("/v2/models/digits/infer", json=digits_body())).status_code == 401
        scrape = await client.get("/metrics")  # open: no credentials needed by default
        assert scrape.status_code == 200
        assert scrape.headers["content-type"].startswith("text/plain")
    s = _samples(scrape.text)
    v1 = {"model": "digits", "version": "1"}
    v2 = {"model": "digits", "version": "2"}
    assert _value(s, "fermion_requests_total", **v2, status="200") == 4
    assert _value(s, "fermion_requests_total", **v2, status="400") == 1
    assert _value(s, "fermion_requests_total", **v1, status="200") == 1
    ok = {**v2, "status_class": "2xx"}
    assert _value(s, "fermion_request_duration_seconds_count", **ok) == 4
    assert _value(s, "fermion_request_duration_seconds_sum", **ok) > 0
    assert _value(s, "fermion_request_duration_seconds_bucket", **ok, le="+Inf") == 4
    assert _value(s, "fermion_request_duration_seconds_count", **v2, status_class="4xx") == 1
    assert _value(s, "fermion_queue_duration_seconds_count", **v2) == 4
    assert _value(s, "fermion_compute_duration_seconds_count", **v2) == 4
    assert _value(s, "fermion_batch_size_count", **v2) == 4
    assert _value(s, "fermion_batch_size_sum", **v2) == 7
    assert _value(s, "fermion_batch_size_bucket", **v2, le="1.0") == 3
    assert _value(s, "fermion_batch_size_bucket", **v2, le="4.0") == 4
    assert _value(s, "fermion_queue_depth", **v2) == 0
    assert _value(s, "fermion_queue_capacity", **v2) == 2048  # batching.max_queue_size
    assert _value(s, "fermion_replicas", **v2) == 1  # backend local: one per version
    assert _value(s, "fermion_ready") == 1
    assert _value(s, "fermion_version_ready", **v1) == _value(s, "fermion_version_ready", **v2) == 1
    assert _value(s, "fermion_inflight_requests", model="digits") == 0
    assert _value(s, "fermion_rejected_requests_total", model="digits", reason="invalid") == 1
    rejected = _value(
        s, "fermion_rejected_requests_total", model="digits", reason="unauthenticated"
    )
    assert rejected == 1
    # Refused at the door: no version; counted and timed like every other request.
    door = {"model": "digits", "version": ""}
    assert _value(s, "fermion_requests_total", **door, status="401") == 1
    assert _value(s, "fermion_request_duration_seconds_count", **door, status_class="4xx") == 1
    assert any(name.startswith("process_") for name, _ in s)


def test_histogram_buckets() -> None:
    m = GatewayMetrics()
    vm = m.version("m", 3)
    for seconds in (0.0004, 0.002, 0.002, 30.0):
        vm.latency.observe(seconds)
    vm.ok = 4
    s = _samples(m.render().decode())
    labels = {"model": "m", "version": "3", "status_class": "2xx"}
    assert _value(s, "fermion_request_duration_seconds_bucket", **labels, le="0.0005") == 1
    assert _value(s, "fermion_request_duration_seconds_bucket", **labels, le="0.0025") == 3
    assert _value(s, "fermion_request_duration_seconds_bucket", **labels, le="10.0") == 3
    assert _value(s, "fermion_request_duration_seconds_bucket", **labels, le="+Inf") == 4


async def test_route_and_shadow_families_in_the_one_registry(demo_store: ModelStore) -> None:
    config = FermionConfig.model_validate(
        {"routes": {"digits": {"split": {1: 100}, "shadow": {"version": 2, "percent": 100}}}}
    )
    async with serve_in_process(config, demo_store) as gw:
        for _ in range(3):
            r = await gw.client.post("/v2/models/digits/infer", json=digits_body())
            assert r.status_code == 200 and r.headers["fermion-model-version"] == "1"
            for _ in range(500):  # one copy at a time: none is shed
                if gw.app.state.routes.shadow.in_flight == 0:
                    break
                await asyncio.sleep(0.01)
        s = _samples((await gw.client.get("/metrics")).text)
        stats = (await gw.client.get("/v2/models/digits/versions/1/stats")).json()
        window = gw.app.state.routes.window("digits", 1).take()
    # One count per request, read three ways: Triton statistics, canary window, Prometheus.
    assert stats["model_stats"][0]["inference_stats"]["success"]["count"] == 3
    assert (window.requests, window.errors, len(window.latencies_ms)) == (3, 0, 3)
    v1 = {"model": "digits", "version": "1"}
    pair = {"model": "digits", "primary": "1", "shadow": "2"}
    assert _value(s, "fermion_requests_total", **v1, status="200") == 3
    assert _value(s, "fermion_route_requests_total", **v1, outcome="ok") == 3
    assert _value(s, "fermion_route_requests_total", **v1, outcome="error") == 0
    assert _value(s, "fermion_shadow_requests_total", **pair, outcome="ok") == 3
    assert _value(s, "fermion_shadow_max_abs_diff_count", **pair) == 3
    # The shadow's own work is no client request of version 2.
    assert _value(s, "fermion_requests_total", model="digits", version="2", status="200") == 0


async def test_metrics_off_or_protected(demo_store: ModelStore, tmp_path: Path) -> None:
    async with serve_in_process(
        FermionConfig(metrics=MetricsConfig(enabled=False)), demo_store
    ) as gw:
        assert gw.app.state.metrics is None
        assert (await gw.client.get("/metrics")).status_code == 404
        r = await gw.client.post("/v2/models/digits/infer", json=digits_body())
        assert r.status_code == 200
    keys = tmp_path / "keys.json"
    key = create_key(keys, "reader", ["read"])
    config = FermionConfig(
        auth=AuthConfig(keys_file=keys), metrics=MetricsConfig(public=False, path="/internal/m")
    )
    async with serve_in_process(config, demo_store) as gw:
        assert (await gw.client.get("/internal/m")).status_code == 401
        assert (await gw.client.get("/internal/m", headers={"x-api-key": key})).status_code == 200


async def test_a_body_refused_by_its_length_is_counted(
    demo_store: ModelStore, tmp_path: Path
) -> None:
    config = FermionConfig.model_validate({"server": {"max_body_bytes": 1024}})
    async with serve_in_process(config, demo_store) as gw:
        big = b"{" + b" " * 4096 + b"}"
        for path in ("/v2/models/digits/infer", "/v2/repository/index"):
            r = await gw.client.post(path, content=big)
            assert r.status_code == 413, r.text
            assert "over the limit of 1024 bytes" in r.json()["error"]
        s = _samples((await gw.client.get("/metrics")).text)
    assert _value(s, "fermion_rejected_requests_total", model="digits", reason="too_large") == 1
    assert _value(s, "fermion_rejected_requests_total", model="", reason="too_large") == 1
    assert _value(s, "fermion_requests_total", model="digits", version="", status="413") == 1
    assert _value(s, "fermion_requests_total", model="digits", version="2", status="200") == 0


def _total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


async def test_every_request_is_counted_once_and_timed_once(
    demo_store: ModelStore, tmp_path: Path
) -> None:
    """One counter of every request by status; rejections are a breakdown, never a 2nd count."""
    keys = tmp_path / "keys.json"
    key = create_key(keys, "ci", ["infer:digits", "read"])
    auth = {"x-api-key": key}
    config = FermionConfig(auth=AuthConfig(keys_file=keys))
    bad = digits_body()
    bad["inputs"][0]["datatype"] = "INT8"
    sent = [
        ("/v2/models/digits/infer", digits_body(), auth, 200),
        ("/v2/models/digits/infer", digits_body(), auth, 200),
        ("/v2/models/digits/infer", bad, auth, 400),
        ("/v2/models/digits/infer", digits_body(), {}, 401),
        ("/v2/models/other/infer", digits_body(), auth, 403),
        ("/v2/models/digits/versions/9/infer", digits_body(), auth, 404),
    ]
    key_all = create_key(keys, "all", ["infer:*"])
    sent.append(("/v2/models/nosuch/infer", digits_body(), {"x-api-key": key_all}, 404))
    async with serve_in_process(config, demo_store) as gw:
        for path, body, headers, status in sent:
            r = await gw.client.post(path, json=body, headers=headers)
            assert r.status_code == status, (path, r.text)
        s = _samples((await gw.client.get("/metrics")).text)
    assert _total(s, "fermion_requests_total") == len(sent)
    assert _total(s, "fermion_request_duration_seconds_count") == len(sent)
    assert _total(s, "fermion_requests_total", status="200") == 2
    refused = sum(1 for *_, status in sent if status != 200)
    assert _total(s, "fermion_rejected_requests_total") == refused
    # Unknown models and versions have no version label; an unknown name counts as one value.
    assert _value(s, "fermion_requests_total", model="digits", version="", status="404") == 1
    assert _value(s, "fermion_requests_total", model="_unknown", version="", status="404") == 1
    assert _value(s, "fermion_requests_total", model="_unknown", version="", status="403") == 1
    for model in ("_unknown", "digits"):
        assert _value(s, "fermion_rejected_requests_total", model=model, reason="unknown_model")


def _series(text: str) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    return set(_samples(text))


async def test_an_unknown_model_flood_adds_no_series(
    demo_store: ModelStore, tmp_path: Path
) -> None:
    """No label value comes from the URL of a request that is unauthenticated or unknown."""
    keys = tmp_path / "keys.json"
    key = create_key(keys, "ci", ["infer:*"])
    limited = create_key(keys, "limited", ["infer:*"])
    config = FermionConfig.model_validate(
        {
            "auth": {"keys_file": str(keys)},
            "limits": {"rate_limits": [{"keys": "limited", "models": "*", "rate": 1, "burst": 1}]},
            "server": {"max_body_bytes": 1024},
        }
    )
    async with serve_in_process(config, demo_store) as gw:

        async def flood(n: int, tag: str) -> None:
            for i in range(n):
                name = f"rand-{tag}-{i}-" + "x" * 100
                path = f"/v2/models/{name}/infer"
                r = await gw.client.post(path, json={})
                assert r.status_code == 401
                r = await gw.client.post(path, json={}, headers={"x-api-key": key})
                assert r.status_code == 404
                big = b"{" + b" " * 2048 + b"}"
                r = await gw.client.post(path, content=big, headers={"x-api-key": key})
                assert r.status_code == 413
                r = await gw.client.post(path, json={}, headers={"x-api-key": limited})
                assert r.status_code in (404, 429)

        await flood(5, "warm")  # every bounded series exists now
        before = _series((await gw.client.get("/metrics")).text)
        await flood(200, "flood")
        text = (await gw.client.get("/metrics")).text
    after = _series(text)
    new = {name for name, _ in after - before}
    assert new <= {"process_open_fds"}, sorted(after - before)[:5]  # values change, not series
    assert "rand-" not in text
    s = _samples(text)
    assert _total(s, "fermion_requests_total", model="_unknown") == 205 * 4
    reasons = {
        reason: _value(s, "fermion_rejected_requests_total", model="_unknown", reason=reason)
        for reason in ("unauthenticated", "too_large", "rate_limited", "unknown_model")
    }
    assert reasons["unauthenticated"] == reasons["too_large"] == 205
    # An unknown model never gets a rate-limit bucket (a flood of names must not grow the
    # limiter): the limited caller's requests to them are 404s, like everyone's.
    assert reasons["rate_limited"] == 0
    assert reasons["unknown_model"] == 205 * 2
