"""``fermion serve`` freezes its heap once its models are loaded and after each load."""

from __future__ import annotations

from pathlib import Path

import httpx

from model_store.store import ModelStore
from tests.helpers.prom import metric_value
from tests.helpers.servers import start_server, stop_server


def _frozen(http: httpx.Client) -> float:
    value = metric_value(http.get("/metrics").text, "fermion_gc_frozen_objects")
    assert value is not None
    return value


def test_heap_is_frozen_after_start_and_after_a_model_load(
    demo_store: ModelStore, tmp_path: Path
) -> None:
    server = start_server(demo_store.root, tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            # Imports, configuration and the loaded models: tens of thousands of objects.
            assert _frozen(http) > 10_000
            assert http.post("/v2/repository/models/digits/unload").status_code == 200
            unloaded = _frozen(http)
            assert http.post("/v2/repository/models/digits/load").status_code == 200
            assert http.get("/v2/models/digits/ready").status_code == 200
            # The versions just loaded (replicas, batchers, manifests) are frozen too.
            assert _frozen(http) > unloaded + 100
            pauses = metric_value(
                http.get("/metrics").text, "fermion_gc_pause_seconds_count", generation="2"
            )
            assert pauses is not None and pauses >= 1  # the settles' collections, timed
    finally:
        stop_server(server)
