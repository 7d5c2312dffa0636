"""The inference hot path as pure ASGI: ``POST /v2/models/{m}[/versions/{v}]/infer``.

It sits innermost in the middleware stack, so request ids, tracing, auth, rate
limits and the body limit still apply, but it skips Starlette's router,
exception middleware and response objects, which cost more per request than the
rest of the gateway together. Every other path goes on to the Starlette app.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.errors import FermionError
from serving.http.connection import CANCEL_ON_DISCONNECT, DISCONNECTED
from serving.http.responses import send_error
from serving.inference.codec import HttpInferBody
from serving.inference.service import InferCall, InferenceService
from serving.protocol import parse_infer_path

__all__ = ["InferenceFastPath"]

log = logging.getLogger("fermion.gateway")


class InferenceFastPath:
    """Serve V2 inference requests directly; pass everything else to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or not path.endswith("/infer"):
            await self.app(scope, receive, send)
            return
        parsed = parse_infer_path(path)
        if parsed is None:
            await self.app(scope, receive, send)
            return
        model, version = parsed
        service: InferenceService[Any] = scope["app"].state.service
        state = scope.setdefault("state", {})
        # The connection cancels this task if its client goes: a request still queued
        # then leaves its queue and is never computed.
        state[CANCEL_ON_DISCONNECT] = True
        headers = Headers(scope=scope)
        call = InferCall(
            model=model,
            version=version,
            headers=headers,
            body=HttpInferBody(_body_reader(receive), headers, service.max_body_bytes),
            started_ns=time.perf_counter_ns(),
            state=state,
        )
        try:
            content, answer_headers = await service.infer(call)
        except (ClientDisconnect, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError):
                task = asyncio.current_task()
                if task is None or task.cancelling() == 0 or not _gone(e):
                    raise
                task.uncancel()  # nobody is left to answer: end quietly
            return
        except FermionError as e:
            await send_error(send, e)
            return
        except Exception:
            log.exception("unhandled error on %s", path)
            await send_error(send, FermionError("internal server error"))
            return
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer_headers.items()]
        raw.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        await send({"type": "http.response.body", "body": content})


def _gone(error: asyncio.CancelledError) -> bool:
    """True when ``error`` is the connection's cancel for a client that disconnected."""
    return bool(error.args) and error.args[0] == DISCONNECTED


def _body_reader(receive: Receive) -> Callable[[], Awaitable[bytes]]:
    """Reads the whole request body from ``receive`` when called."""

    async def read() -> bytes:
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    return read
