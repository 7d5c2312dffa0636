"""An inference request leaves nothing for the garbage collector.

Everything one request creates (the connection's request cycle and scope, the call,
the decoded tensors, the batcher's entry, spans, futures) must be freed by reference
counting as its answer goes out. A reference loop among them leaves them to the
collector instead, and a full collection over the many requests' objects piled up
by then holds the event loop for tens of milliseconds: the p99 stalls of issue 15.

The real app, local backend and demo model; the requests go as HTTP/1.1 bytes
through the gateway's connection protocol over an in-memory transport. Fewer objects
than requests may turn up (a one-off of the process, freed meanwhile); a loop made by
every request leaves a dozen or so per request.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import uvicorn
from uvicorn.server import ServerState

from bench._transport import MemoryTransport
from model_store.store import ModelStore
from serving.auth import create_key
from serving.config import FermionConfig
from serving.http.app import create_app
from serving.http.connection import ConnectionLimits, guarded_protocol
from serving.http.drain import DrainState
from tests.helpers.inprocess import digits_body


def _request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


def _bodies(key: str) -> list[bytes]:
    image = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    json_body = orjson.dumps(digits_body())
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 28, 28],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": image.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    )
    auth = {"x-api-key": key}
    binary_headers = {**auth, "inference-header-content-length": str(len(header))}
    return [
        _request("/v2/models/digits/infer", json_body, {**auth, "x-request-id": "a-1"}),
        _request("/v2/models/digits/infer", header + image.tobytes(), binary_headers),
        _request("/v2/models/digits/versions/1/infer", json_body, auth),
        _request("/v2/models/digits/infer", b"{not json", auth),  # a 400
    ]


async def test_inference_requests_leave_no_garbage(demo_store: ModelStore, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    key = create_key(keys, "t", ["infer:*"])
    config = FermionConfig.model_validate(
        {
            "auth": {"keys_file": str(keys)},
            "limits": {"default_timeout_ms": 10000},
            "batching": {"priority_levels": 2},
        }
    )
    app = create_app(config, store=demo_store)
    server = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning")
    server.load()
    protocol = guarded_protocol(ConnectionLimits(), DrainState())(
        config=server, server_state=ServerState(), app_state={}
    )
    wire = MemoryTransport()
    protocol.connection_made(wire)
    requests = _bodies(key)

    async def ask(raw: bytes) -> int:
        protocol.data_received(raw)
        answer = await asyncio.wait_for(wire.answers.get(), 30)
        return int(answer[9:12])

    async with app.router.lifespan_context(app):
        while not app.state.repository.ready:
            await asyncio.sleep(0.02)
        statuses = [await ask(raw) for raw in requests * 3]  # warm: caches fill
        assert statuses == [200, 200, 200, 400] * 3
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            rounds = 10
            for _ in range(rounds):
                for raw in requests:
                    await ask(raw)
            gc.collect()
            garbage = len(gc.garbage)
            left = Counter(type(o).__qualname__ for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        protocol.connection_lost(None)
    # A loop made by every request leaves at least one object per request (a dozen,
    # typically); what else turns up (a one-off of the process, freed meanwhile) is less.
    asked = rounds * len(requests)
    assert garbage < asked, f"{garbage} objects left to the collector: {left.most_common(8)}"


@pytest.fixture(autouse=True)
def _collector_back_on() -> Any:
    yield
    gc.set_debug(0)
    gc.enable()
