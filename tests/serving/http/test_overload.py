"""Overload over HTTP in process: a full queue answers 503 with Retry-After; a gzip bomb
is refused without being inflated."""

from __future__ import annotations

import asyncio
import gzip
import tracemalloc
import zlib

import httpx
import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families

from model_store.store import ModelStore
from serving.config import FermionConfig
from tests.helpers.ab_models import MODEL
from tests.helpers.inprocess import InProcessGateway, digits_body, serve_in_process
from tests.helpers.polling import until

_SLOW = f"/v2/models/{MODEL}/versions/4/infer"  # version 4 spins ~1 s on x[:, 3] = 300


def _body(spin: float) -> dict[str, object]:
    x = np.zeros((1, 4), np.float32)
    x[:, 3] = spin
    return {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}]
    }


def _rejected(text: str, model: str, reason: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "fermion_rejected_requests_total" and s.labels == {
                "model": model,
                "reason": reason,
            }:
                return s.value
    return 0.0


async def test_a_full_queue_answers_503_with_retry_after_and_counts_it(
    ab_store: ModelStore,
) -> None:
    queue_size = 2
    config = FermionConfig.model_validate(
        {
            "store": {"root": str(ab_store.root)},
            "models": {MODEL: {"batching": {"max_queue_size": queue_size, "max_batch_size": 1}}},
        }
    )
    async with serve_in_process(config, ab_store) as gw:
        _, batcher = gw.repository.resolve(MODEL, "4")
        before = _rejected((await gw.client.get("/metrics")).text, MODEL, "queue_full")
        slow = asyncio.ensure_future(gw.client.post(_SLOW, json=_body(300.0)))
        await until(lambda: batcher.running == 1, "the slow batch runs")
        queued = [
            asyncio.ensure_future(gw.client.post(_SLOW, json=_body(0.0))) for _ in range(queue_size)
        ]
        await until(lambda: batcher.queue_depth == queue_size, "the queue fills")
        refused = await gw.client.post(_SLOW, json=_body(0.0))
        assert batcher.running == 1, "the slow batch ended before the check: not a full queue"
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert "queue full" in refused.json()["error"]
        answers = await asyncio.gather(slow, *queued)
        assert [a.status_code for a in answers] == [200] * (queue_size + 1)
        after = _rejected((await gw.client.get("/metrics")).text, MODEL, "queue_full")
        assert after - before == 1


def _gzip_of_zeros(size: int) -> bytes:
    """A gzip body of ``size`` zero bytes, built a MiB at a time."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"\0" * (1 << 20)
    parts = [z.compress(chunk) for _ in range(size >> 20)]
    return b"".join([*parts, z.flush()])


async def _peak_during(gw: InProcessGateway, content: bytes) -> tuple[httpx.Response, int]:
    tracemalloc.start()
    try:
        r = await gw.client.post(
            "/v2/models/digits/infer",
            content=content,
            headers={"content-encoding": "gzip", "content-type": "application/json"},
        )
        return r, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_a_gzip_bomb_is_refused_without_inflating_it(demo_store: ModelStore) -> None:
    limit = 1 << 20
    bomb = _gzip_of_zeros(256 << 20)  # ~250 KB sent, 256 MiB inflated: 1000:1
    assert len(bomb) < limit
    config = FermionConfig.model_validate({"server": {"max_body_bytes": limit}})
    async with serve_in_process(config, demo_store) as gw:
        r, peak = await _peak_during(gw, bomb)
        assert r.status_code == 413
        assert r.json() == {"error": f"decompressed request body over the limit of {limit} bytes"}
        # Inflating stops at the limit: memory stays within a few limits, far below 256 MiB.
        assert peak < 8 * limit, peak
        # A gzip body under the limit still works.
        ok = await gw.client.post(
            "/v2/models/digits/infer",
            content=gzip.compress(orjson.dumps(digits_body())),
            headers={"content-encoding": "gzip", "content-type": "application/json"},
        )
        assert ok.status_code == 200, ok.text
