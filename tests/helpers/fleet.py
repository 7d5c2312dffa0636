"""A fleet of real gateways on one real Redis, and clients that record every answer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from model_store.store import ModelStore
from tests.helpers.ab_models import MODEL, build_ab_store
from tests.helpers.servers import RunningServer, start_server

__all__ = [
    "LIMITED",
    "Answer",
    "Load",
    "admin",
    "build_fleet_store",
    "infer",
    "start_gateways",
]

#: A second model (version 1 of ``clf`` under another name), the one rate-limited.
LIMITED = "limited"


def build_fleet_store(root: Path) -> ModelStore:
    """``clf`` versions 1-4 (see ab_models) and ``limited`` version 1."""
    store = build_ab_store(root)
    if LIMITED not in store.models():
        from compilers.pipeline import build_model

        samples = np.random.default_rng(0).random((8, 4)).astype(np.float32)
        onnx_path = root.parent / f"{root.name}-onnx" / "clf-v1.onnx"
        build_model(store, LIMITED, onnx_path=onnx_path, samples=samples, max_batch_size=64)
    return store


def start_gateways(store: Path, tmp: Path, config: str, count: int) -> list[RunningServer]:
    """``count`` gateways with the same configuration, started side by side."""
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(start_server, store, tmp, config, 90.0) for _ in range(count)]
        return [f.result() for f in futures]


def body(x: np.ndarray) -> dict[str, Any]:
    """A V2 JSON request for ``x`` [N, 4]."""
    return {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }


def infer(client: httpx.Client, url: str, x: np.ndarray, model: str = MODEL) -> httpx.Response:
    """One inference request."""
    return client.post(f"{url}/v2/models/{model}/infer", json=body(x))


def admin(url: str, method: str, path: str, payload: Any = None) -> httpx.Response:
    """One admin API call (not checked)."""
    return httpx.request(method, f"{url}/admin{path}", json=payload, timeout=10)


@dataclass(frozen=True)
class Answer:
    """One request: when it was sent, to which gateway, and what came back."""

    sent: float
    gateway: int
    status: int
    version: str | None
    retry_after: str | None


@dataclass
class Load:
    """Client threads sending requests to gateways until the block ends."""

    urls: list[str]
    make_x: Callable[[int, int], np.ndarray]
    model: str = MODEL
    threads_per_gateway: int = 1
    pause_s: float = 0.0
    answers: list[Answer] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self, gateway: int, seed: int) -> None:
        url = self.urls[gateway]
        with httpx.Client(timeout=30) as client:
            i = seed
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    r = infer(client, url, self.make_x(gateway, i), self.model)
                except httpx.TransportError as e:
                    self.failures.append(f"gateway {gateway}: {type(e).__name__}: {e}")
                    time.sleep(0.05)
                    continue
                self.answers.append(
                    Answer(
                        sent,
                        gateway,
                        r.status_code,
                        r.headers.get("fermion-model-version"),
                        r.headers.get("retry-after"),
                    )
                )
                if r.status_code not in (200, 429):
                    self.failures.append(f"gateway {gateway}: {r.status_code} {r.text[:200]}")
                i += 1000
                if self.pause_s:
                    time.sleep(self.pause_s)

    def __enter__(self) -> Load:
        self._workers = [
            threading.Thread(target=self._run, args=(g, t), daemon=True)
            for g in range(len(self.urls))
            for t in range(self.threads_per_gateway)
        ]
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(timeout=30)
