"""The real gateway app in process (httpx over ASGI, lifespan running), for fast route tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette

from model_store.store import ModelStore
from serving.config import FermionConfig
from serving.http.app import create_app
from serving.inference.repository import ModelRepository


def digits_body(rows: int = 1, **parameters: Any) -> dict[str, Any]:
    """A V2 JSON body of ``rows`` blank digits, with request ``parameters``."""
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": "input",
                "shape": [rows, 1, 28, 28],
                "datatype": "FP32",
                "data": [0.0] * (rows * 784),
            }
        ]
    }
    if parameters:
        body["parameters"] = parameters
    return body


@dataclass
class InProcessGateway:
    """A running app and a client speaking to it over ASGI."""

    app: Starlette
    client: httpx.AsyncClient

    @property
    def repository(self) -> ModelRepository:
        repo: ModelRepository = self.app.state.repository
        return repo

    def computed_rows(self) -> int:
        """Rows every batcher of the app has computed so far."""
        return sum(
            sv.batcher.stats.inference_count for sv in self.repository.served() if sv.batcher
        )


@asynccontextmanager
async def serve_in_process(
    config: FermionConfig, store: ModelStore, **kwargs: Any
) -> AsyncIterator[InProcessGateway]:
    """``create_app`` with its lifespan running, once every model is ready."""
    app = create_app(config, store=store, **kwargs)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as client,
    ):
        await wait_ready(client, "/v2/health/ready", "the in-process gateway")
        yield InProcessGateway(app, client)


async def wait_ready(client: httpx.AsyncClient, url: str, what: str) -> None:
    """Return once ``url`` (a gateway's ``/v2/health/ready``) answers 200, polling every
    20 ms for up to 60 s; then fail, naming ``what`` never became ready."""
    deadline = time.monotonic() + 60
    while (await client.get(url)).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} never became ready")
        await asyncio.sleep(0.02)
