"""Request ids: echo the client's ``x-request-id`` (or a new one) on every response."""

from __future__ import annotations

import itertools
import os
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.observability.counters import REQUEST_STARTED_NS

__all__ = ["REQUEST_ID", "RequestIdMiddleware", "request_id_of", "start_request"]

#: The header that carries a request's id, both ways.
REQUEST_ID = b"x-request-id"
# Unique per process start (random prefix) and per request (counter): cheaper than uuid4.
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def _new_request_id() -> bytes:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}".encode()


def request_id_of(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The client's ``x-request-id`` (at most 128 ASCII characters), or a new one."""
    for key, value in headers:
        if key == REQUEST_ID:
            value = value[:128]
            return value if value and value.isascii() else _new_request_id()
    return _new_request_id()


def start_request(scope: Scope) -> bytes:
    """Note when the request arrived (``REQUEST_STARTED_NS``) and its id
    (``scope["state"]["request_id"]``); the id, for the response's header."""
    REQUEST_STARTED_NS.set(time.perf_counter_ns())
    request_id = request_id_of(scope["headers"])
    scope.setdefault("state", {})["request_id"] = request_id.decode()
    return request_id


class RequestIdMiddleware:
    """Echo the client's ``x-request-id`` (or a new one) on every response.

    Outermost, it also notes when the request arrived (``REQUEST_STARTED_NS``), so that
    a request refused at the door is timed like any other.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = start_request(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REQUEST_ID, request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)
