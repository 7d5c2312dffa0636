"""The replica continues the trace context it is handed (the carrier), without Ray.

That the carrier really crosses the Ray hop, from the gateway's process to a replica's,
is checked end to end in ``tests/e2e/test_ray_backend.py``.
"""

from __future__ import annotations

import numpy as np
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from model_store.store import ModelStore
from serving.inference.backends.ray import ReplicaDeployment
from serving.observability import tracing


def test_replica_span_is_a_child_of_the_span_in_its_carrier(
    demo_store: ModelStore, exporter: InMemorySpanExporter
) -> None:
    manifest = demo_store.manifest("digits", 2)
    replica = ReplicaDeployment(
        str(demo_store.root), manifest.model_dump_json(), ["onnxruntime"], 1
    )
    x = np.zeros((3, 1, 28, 28), np.float32)
    tracer = tracing.current_tracer()
    assert tracer is not None
    with tracer.start_as_current_span("fermion.execute") as gateway_span:
        carrier = tracing.inject_context()
        assert "traceparent" in carrier
    # Only the carrier is handed over, as it would be across processes.
    out = replica.infer({"input": x}, carrier)
    assert out["logits"].shape == (3, 10)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    remote = spans["fermion.replica.execute"]
    assert remote.context.trace_id == gateway_span.get_span_context().trace_id
    assert remote.parent is not None
    assert remote.parent.span_id == gateway_span.get_span_context().span_id
    assert remote.attributes is not None and remote.attributes["fermion.batch.rows"] == 3


def test_no_carrier_when_tracing_is_off(demo_store: ModelStore) -> None:
    assert tracing.current_tracer() is None
    assert tracing.inject_context() == {}
    manifest = demo_store.manifest("digits", 1)
    replica = ReplicaDeployment(
        str(demo_store.root), manifest.model_dump_json(), ["onnxruntime"], 1
    )
    assert replica.infer({"input": np.zeros((1, 1, 28, 28), np.float32)})["logits"].shape == (1, 10)
