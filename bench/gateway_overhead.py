"""Per-request cost of the gateway's own layers (auth, limits, tracing, metrics), in process.

Drives the real ASGI app (``create_app``) with one binary-tensor request at a time,
against a backend that answers zeros, so that only the gateway is measured: the
middleware, the route, the codec and the batcher. Prints microseconds per request
for each configuration (CPU time of the process, so that other load on the machine
matters less), measured interleaved in one run so that they compare.

    python -m bench.gateway_overhead --store model_store [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import numpy as np

from model_store.manifest import ModelManifest
from model_store.store import ModelStore
from serving.config import FermionConfig
from serving.http.app import create_app
from serving.inference.backends import Backend

__all__ = ["main"]


class _ZerosBackend(Backend):
    """Answers every batch with zeros of the manifest's output shapes: no model compute."""

    def __init__(self) -> None:
        self._outputs: dict[tuple[str, int], list[tuple[str, list[int]]]] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def load(self, manifest: ModelManifest) -> dict[str, Any]:
        self._outputs[(manifest.name, manifest.version)] = [
            (o.name, o.shape) for o in manifest.outputs
        ]
        return {"backend": "zeros"}

    async def unload(self, name: str, version: int) -> None:
        self._outputs.pop((name, version), None)

    async def infer_batch(
        self, name: str, version: int, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        rows = next(iter(inputs.values())).shape[0]
        return {
            n: np.zeros([rows, *shape[1:]], dtype=np.float32)
            for n, shape in self._outputs[(name, version)]
        }


def _request(model: str, headers: dict[str, str]) -> tuple[dict[str, Any], bytes]:
    tensor = np.zeros((1, 1, 28, 28), dtype=np.float32).tobytes()
    header = (
        b'{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32",'
        b'"parameters":{"binary_data_size":%d}}],"outputs":[{"name":"logits",'
        b'"parameters":{"binary_data":true}}]}' % len(tensor)
    )
    body = header + tensor
    raw = [
        (b"content-type", b"application/octet-stream"),
        (b"inference-header-content-length", str(len(header)).encode()),
        (b"content-length", str(len(body)).encode()),
        *((k.encode(), v.encode()) for k, v in headers.items()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": f"/v2/models/{model}/infer",
        "raw_path": f"/v2/models/{model}/infer".encode(),
        "query_string": b"",
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    return scope, body


async def _measure(
    config: FermionConfig, store: ModelStore, headers: dict[str, str], n: int
) -> list[float]:
    app = create_app(config, store=store, backend=_ZerosBackend())
    model = store.models()[0]
    scope, body = _request(model, headers)
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    rounds: list[float] = []
    async with app.router.lifespan_context(app):
        while not app.state.repository.ready:
            await asyncio.sleep(0.01)
        for _ in range(200):  # warm-up
            await app(dict(scope), receive, send)
        for _ in range(5):
            started = time.process_time()
            for _ in range(n // 5):
                await app(dict(scope), receive, send)
            rounds.append((time.process_time() - started) / (n // 5) * 1e6)
    if set(statuses) != {200}:
        raise RuntimeError(f"unexpected statuses {sorted(set(statuses))}")
    return rounds


def _configs(
    keys_file: Path, store: ModelStore
) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
    from serving.auth import create_key

    key = create_key(keys_file, "bench", ["infer:*"], replace=True)
    auth = {"keys_file": str(keys_file)}
    rate = {"rate_limits": [{"rate": 1e9, "burst": 1_000_000_000}]}
    sampled_out = {"exporter": "console", "sample_ratio": 0.0}
    model = store.models()[0]
    versions = store.versions(model)
    # As tail_bench's guarded configuration, tracing sampled out (no exporter at hand).
    guarded: dict[str, Any] = {
        "auth": auth,
        "limits": {"default_timeout_ms": 10000},
        "batching": {"priority_levels": 2},
        "tracing": sampled_out,
    }
    if len(versions) > 1:
        guarded["routes"] = {
            model: {
                "split": {str(versions[-1]): 1},
                "shadow": {"version": versions[-2], "percent": 1},
            }
        }
    return {
        "metrics off (all off)": ({"metrics": {"enabled": False}}, {}),
        "default (metrics on)": ({}, {}),
        "+ API key auth": ({"auth": auth}, {"x-api-key": key}),
        "+ auth + rate limit": ({"auth": auth, "limits": rate}, {"x-api-key": key}),
        "+ tracing (sampled out)": ({"tracing": sampled_out}, {}),
        "+ deadline (10 s)": ({"limits": {"default_timeout_ms": 10000}}, {}),
        "+ 2 priority levels": ({"batching": {"priority_levels": 2}}, {}),
        "guarded (tail_bench's, sampled out)": (guarded, {"x-api-key": key}),
    }


def main(argv: list[str] | None = None) -> int:
    """Print µs per request for each configuration."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument(
        "--defaults-only",
        action="store_true",
        help="measure FermionConfig() alone (runs on older trees too, for a baseline)",
    )
    args = parser.parse_args(argv)
    store = ModelStore(args.store)
    with tempfile.TemporaryDirectory() as tmp:
        if args.defaults_only:
            rounds = asyncio.run(_measure(FermionConfig(), store, {}, args.requests))
            print(f"defaults: {statistics.median(rounds):.1f} µs/request")
            return 0
        configs = _configs(Path(tmp) / "keys.json", store)
        results: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(3):  # interleave the configurations
            for name, (data, headers) in configs.items():
                config = FermionConfig.model_validate(data)
                results[name] += asyncio.run(_measure(config, store, headers, args.requests // 3))
    base = statistics.median(results["metrics off (all off)"])
    print(f"{'configuration':40} {'µs/request':>11} {'vs all off':>11}")
    for name, rounds in results.items():
        median = statistics.median(rounds)
        print(f"{name:40} {median:11.1f} {median - base:+10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
