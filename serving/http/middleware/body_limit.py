"""The body size limit: 413 before a body over the limit is read whole."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import PayloadTooLarge
from serving.http.responses import RejectHook, send_error

__all__ = ["BodyRefused", "BodySizeLimitMiddleware", "declared_over", "read_past"]


def declared_over(scope: Scope, max_bytes: int) -> BodyRefused | None:
    """The 413 of a request whose Content-Length is over ``max_bytes``, else None."""
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = -1
            if declared > max_bytes:
                return BodyRefused(
                    f"request body of {declared} bytes is over the limit of {max_bytes} bytes"
                )
            return None
    return None


def read_past(limit: int) -> PayloadTooLarge:
    """The 413 of a body found larger than ``limit`` bytes while it is read."""
    return PayloadTooLarge(f"request body over the limit of {limit} bytes")


def _limited_receive(receive: Receive, limit: int) -> Receive:
    """``receive``, raising ``read_past(limit)`` once the body read passes ``limit`` bytes."""
    seen = 0

    async def limited() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise read_past(limit)
        return message

    return limited


class BodySizeLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413, before reading them whole.

    A body refused from its Content-Length is counted through ``on_reject("",
    "too_large")`` (no model: inference never reaches this chain, ``InferPath`` counts
    its own by model); one found too large while
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
        refused = declared_over(scope, self.max_bytes)
        if refused is not None:
            if self._on_reject is not None:
                self._on_reject("", "too_large")
            await send_error(send, refused)
            return
        await self.app(scope, _limited_receive(receive, self.max_bytes), send)


class BodyRefused(PayloadTooLarge):
    """413 before the body was read: the connection closes, the body is never drained."""

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}
