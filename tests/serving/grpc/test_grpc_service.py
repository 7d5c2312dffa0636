"""The gRPC transport in process over the real service: deadlines, cancellation, a full
queue, a failed batch, rate limits, sticky routes, traces and counts, as over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from model_store.store import ModelStore
from serving.config import FermionConfig
from serving.grpc._proto import grpc_service_pb2 as pb
from tests.helpers.ab_models import FAIL_AT, MODEL, expected_logits
from tests.helpers.grpc_inprocess import serve_grpc_in_process
from tests.helpers.polling import until

C = grpc.StatusCode
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _request(x: np.ndarray, version: str = "", **parameters: pb.InferParameter) -> Any:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(x.shape))
    return pb.ModelInferRequest(
        model_name=MODEL,
        model_version=version,
        inputs=[tensor],
        raw_input_contents=[x.astype(np.float32).tobytes()],
        parameters=parameters,
    )


def _slow(spin: float) -> Any:
    x = np.zeros((1, 4), np.float32)
    x[:, 3] = spin
    return _request(x, "4")


def _logits(response: pb.ModelInferResponse) -> np.ndarray:
    out = np.frombuffer(response.raw_output_contents[0], np.float32)
    return out.reshape(list(response.outputs[0].shape))


def _one_at_a_time(store: ModelStore, **extra: Any) -> FermionConfig:
    return FermionConfig.model_validate(
        {
            "store": {"root": str(store.root)},
            "models": {MODEL: {"batching": {"max_batch_size": 1, "max_queue_size": 2}}},
            **extra,
        }
    )


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def test_a_deadline_shorter_than_the_queue_wait_is_never_computed(
    ab_store: ModelStore,
) -> None:
    async with serve_grpc_in_process(_one_at_a_time(ab_store), ab_store) as (gw, stub):
        _, batcher = gw.repository.resolve(MODEL, "4")
        slow = asyncio.ensure_future(stub.ModelInfer(_slow(300.0)))
        await until(lambda: batcher.running == 1, "the slow batch runs")
        error = await _error(stub.ModelInfer(_slow(0.0), timeout=0.2))
        assert error.code() is C.DEADLINE_EXCEEDED
        await until(lambda: batcher.queue_depth == 0, "the late request leaves the queue")
        assert batcher.running == 1, "the slow batch ended first: the check proves nothing"
        await slow
        assert batcher.stats.inference_count == 1  # the slow request's row only


async def test_a_cancelled_call_leaves_the_queue(ab_store: ModelStore) -> None:
    async with serve_grpc_in_process(_one_at_a_time(ab_store), ab_store) as (gw, stub):
        _, batcher = gw.repository.resolve(MODEL, "4")
        slow = asyncio.ensure_future(stub.ModelInfer(_slow(300.0)))
        await until(lambda: batcher.running == 1, "the slow batch runs")
        queued = stub.ModelInfer(_slow(0.0))
        await until(lambda: batcher.queue_depth == 1, "the second request queues")
        queued.cancel()
        await until(lambda: batcher.queue_depth == 0, "the cancelled request leaves")
        assert batcher.running == 1, "the slow batch ended first: the check proves nothing"
        await slow
        assert batcher.stats.inference_count == 1


async def test_a_full_queue_is_unavailable_with_retry_after(ab_store: ModelStore) -> None:
    async with serve_grpc_in_process(_one_at_a_time(ab_store), ab_store) as (gw, stub):
        _, batcher = gw.repository.resolve(MODEL, "4")
        slow = asyncio.ensure_future(stub.ModelInfer(_slow(300.0)))
        await until(lambda: batcher.running == 1, "the slow batch runs")
        queued = [asyncio.ensure_future(stub.ModelInfer(_slow(0.0))) for _ in range(2)]
        await until(lambda: batcher.queue_depth == 2, "the queue fills")
        error = await _error(stub.ModelInfer(_slow(0.0)))
        assert batcher.running == 1, "the slow batch ended first: not a full queue"
        assert error.code() is C.UNAVAILABLE
        assert "queue full" in (error.details() or "")
        assert dict(error.trailing_metadata() or ())["retry-after"] == "1"
        await asyncio.gather(slow, *queued)


async def test_a_failed_batch_is_internal_and_the_next_request_works(
    ab_store: ModelStore,
) -> None:
    config = FermionConfig.model_validate({"store": {"root": str(ab_store.root)}})
    async with serve_grpc_in_process(config, ab_store) as (_, stub):
        bad = np.full((1, 4), FAIL_AT, np.float32)
        error = await _error(stub.ModelInfer(_request(bad, "3")))
        assert error.code() is C.INTERNAL
        x = np.ones((1, 4), np.float32)
        response = await stub.ModelInfer(_request(x, "3"))
        assert np.allclose(_logits(response), expected_logits(3, x))


async def test_rate_limited_calls_are_resource_exhausted(ab_store: ModelStore) -> None:
    config = FermionConfig.model_validate(
        {
            "store": {"root": str(ab_store.root)},
            "limits": {"rate_limits": [{"rate": 0.01, "burst": 1}]},
        }
    )
    async with serve_grpc_in_process(config, ab_store) as (gw, stub):
        x = np.ones((1, 4), np.float32)
        await stub.ModelInfer(_request(x))
        error = await _error(stub.ModelInfer(_request(x)))
        assert error.code() is C.RESOURCE_EXHAUSTED
        assert error.details() == f"rate limit exceeded for {MODEL}"
        assert int(dict(error.trailing_metadata() or ())["retry-after"]) >= 1
        # Health is never limited; HTTP shares the same bucket (ip:127.0.0.1 both ways).
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        metrics = (await gw.client.get("/metrics")).text
        assert _sample(metrics, "fermion_rejected_requests_total", reason="rate_limited") == 1


def _sample(text: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_a_sticky_header_in_metadata_keeps_a_caller_on_one_version(
    ab_store: ModelStore,
) -> None:
    config = FermionConfig.model_validate(
        {
            "store": {"root": str(ab_store.root)},
            "routes": {MODEL: {"split": {1: 50, 2: 50}, "sticky": {"header": "x-user-id"}}},
        }
    )
    async with serve_grpc_in_process(config, ab_store) as (gw, stub):
        x = np.ones((1, 4), np.float32)
        seen: dict[str, set[str]] = {}
        for user in [f"u{i}" for i in range(12)] * 3:
            call = stub.ModelInfer(_request(x), metadata=(("x-user-id", user),))
            response = await call
            trailers = dict(await call.trailing_metadata() or ())
            assert trailers["fermion-model-version"] == response.model_version
            assert np.allclose(_logits(response), expected_logits(int(response.model_version), x))
            seen.setdefault(user, set()).add(response.model_version)
        assert all(len(versions) == 1 for versions in seen.values())
        assert set().union(*seen.values()) == {"1", "2"}
        # Counted as over HTTP: one request per call, per version.
        metrics = (await gw.client.get("/metrics")).text
        assert _sample(metrics, "fermion_requests_total", model=MODEL) == 36


async def test_traceparent_metadata_continues_the_trace(ab_store: ModelStore) -> None:
    exporter = InMemorySpanExporter()
    config = FermionConfig.model_validate({"store": {"root": str(ab_store.root)}})
    async with serve_grpc_in_process(config, ab_store, span_exporter=exporter) as (_, stub):
        metadata = (
            ("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),
            ("x-request-id", "g-1"),
        )
        call = stub.ModelInfer(_request(np.ones((1, 4), np.float32)), metadata=metadata)
        await call
        assert dict(await call.trailing_metadata() or ())["x-request-id"] == "g-1"
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == int(TRACE_ID, 16)]
    server = next(s for s in spans if s.name == "inference.GRPCInferenceService/ModelInfer")
    assert server.attributes is not None
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["fermion.request_id"] == "g-1"
    assert {"fermion.route", "fermion.queue", "fermion.batch"} <= {s.name for s in spans}


async def test_a_sticky_parameter_and_a_shadow_copy_work_over_grpc(ab_store: ModelStore) -> None:
    config = FermionConfig.model_validate(
        {
            "store": {"root": str(ab_store.root)},
            "routes": {
                MODEL: {
                    "split": {1: 50, 3: 50},
                    "sticky": {"parameter": "user"},
                    "shadow": {"version": 2, "max_queue_depth": 64},
                }
            },
        }
    )
    async with serve_grpc_in_process(config, ab_store) as (gw, stub):
        x = np.ones((1, 4), np.float32)
        seen: dict[str, set[str]] = {}
        for user in [f"u{i}" for i in range(8)] * 2:
            user_param = pb.InferParameter(string_param=user)
            response = await stub.ModelInfer(_request(x, user=user_param))
            seen.setdefault(user, set()).add(response.model_version)
        assert all(len(versions) == 1 for versions in seen.values())
        assert set().union(*seen.values()) == {"1", "3"}

        def mirrored() -> float:
            return sum(
                s.value
                for family in text_string_to_metric_families(gw.app.state.metrics.render().decode())
                for s in family.samples
                if s.name == "fermion_shadow_requests_total" and s.labels["outcome"] == "ok"
            )

        await until(lambda: mirrored() == 16, "every call mirrored to the shadow")


async def test_server_ready_is_false_while_the_gateway_drains(ab_store: ModelStore) -> None:
    config = FermionConfig.model_validate({"store": {"root": str(ab_store.root)}})
    async with serve_grpc_in_process(config, ab_store) as (gw, stub):
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        gw.app.state.drain.begin()  # what SIGTERM does
        assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
        # Still serving meanwhile, as over HTTP.
        x = np.ones((1, 4), np.float32)
        response = await stub.ModelInfer(_request(x, "1"))
        np.testing.assert_allclose(_logits(response), expected_logits(1, x), rtol=1e-5)
        ready = await gw.client.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["not_ready"][0]["state"] == "DRAINING"
