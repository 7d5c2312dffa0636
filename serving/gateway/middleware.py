"""Small pure-ASGI middleware: request ids and the body size limit; errors from middleware."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.auth.scopes import infer_model
from serving.codec import encode_error
from serving.errors import FermionError, PayloadTooLarge

#: Counts a refused request: ``(model, reason)``, model ``""`` when none is named.
RejectHook = Callable[[str, str], None]

__all__ = ["BodySizeLimitMiddleware", "RejectHook", "RequestIdMiddleware", "send_error"]

_REQUEST_ID = b"x-request-id"
# Unique per process start (random prefix) and per request (counter): cheaper than uuid4.
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def _new_request_id() -> bytes:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}".encode()


async def send_error(send: Send, error: FermionError) -> None:
    """Answer with ``error`` as a V2 error body, from middleware outside the app's handlers."""
    body = encode_error(error.message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers().items()),
    ]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    """Echo the client's ``x-request-id`` (or a new one) on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = b""
        for key, value in scope["headers"]:
            if key == _REQUEST_ID:
                request_id = value[:128]
                break
        if not request_id or not request_id.isascii():
            request_id = _new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (_REQUEST_ID, request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodySizeLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413, before reading them whole.

    A body refused from its Content-Length is counted through ``on_reject(model,
    "too_large")`` (model ``""`` off the inference routes); one found too large while
    read fails inside the route, which counts it like any other refusal.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        on_reject: RejectHook | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self._on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    if self._on_reject is not None:
                        model = infer_model(scope["method"], scope["path"]) or ""
                        self._on_reject(model, "too_large")
                    await self._reject(send, declared)
                    return
                break
        limit = self.max_bytes
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"request body over the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, send: Send, declared: int) -> None:
        await send_error(
            send,
            _BodyRefused(
                f"request body of {declared} bytes is over the limit of {self.max_bytes} bytes"
            ),
        )


class _BodyRefused(PayloadTooLarge):
    """413 before the body was read: the connection closes, the body is never drained."""

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}
