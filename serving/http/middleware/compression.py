"""Response compression: gzip when the client asks for it (``Accept-Encoding: gzip``).

Only whole responses (one body message, as every Fermion route sends) of at least
``minimum_size`` bytes are compressed; a large one is compressed in a worker thread, so
that a big tensor answer never blocks the event loop. Streamed responses, and responses
that already have a ``Content-Encoding``, pass as they are.
"""

from __future__ import annotations

import asyncio
import gzip

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["GzipResponseMiddleware", "accepts_gzip", "gzip_answer", "wants_gzip"]

#: Bodies at least this large are compressed off the event loop.
_THREAD_SIZE = 256 * 1024


def accepts_gzip(value: bytes) -> bool:
    """Whether an ``Accept-Encoding`` value accepts gzip (``gzip;q=0`` refuses it)."""
    for part in value.lower().split(b","):
        coding, _, params = part.strip().partition(b";")
        if coding.strip() == b"gzip":
            q = params.strip().removeprefix(b"q=")
            try:
                return not params.strip() or float(q) > 0
            except ValueError:
                return True
    return False


def wants_gzip(scope: Scope) -> bool:
    """Whether the request of ``scope`` accepts a gzip answer."""
    return any(k == b"accept-encoding" and accepts_gzip(v) for k, v in scope["headers"])


async def gzip_answer(
    headers: list[tuple[bytes, bytes]], body: bytes, *, minimum_size: int = 1024, level: int = 5
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A whole answer's headers and body, gzipped when it is at least ``minimum_size``
    bytes and not encoded yet (a large one in a worker thread), else as they are."""
    if len(body) < minimum_size or any(k.lower() == b"content-encoding" for k, _ in headers):
        return headers, body
    if len(body) >= _THREAD_SIZE:
        body = await asyncio.to_thread(gzip.compress, body, level, mtime=0)
    else:
        body = gzip.compress(body, level, mtime=0)
    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    headers += [
        (b"content-encoding", b"gzip"),
        (b"content-length", str(len(body)).encode()),
        (b"vary", b"Accept-Encoding"),
    ]
    return headers, body


class GzipResponseMiddleware:
    """gzip whole responses of at least ``minimum_size`` bytes for clients that accept it."""

    def __init__(self, app: ASGIApp, *, minimum_size: int = 1024, level: int = 5) -> None:
        self.app = app
        self._minimum = minimum_size
        self._level = level

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not wants_gzip(scope):
            await self.app(scope, receive, send)
            return
        start: Message | None = None

        async def compressing_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            first, start = start, None
            if message.get("more_body", False):
                await send(first)
                await send(message)
                return
            headers, body = await gzip_answer(
                list(first.get("headers", [])),
                message.get("body", b""),
                minimum_size=self._minimum,
                level=self._level,
            )
            await send({**first, "headers": headers})
            await send({**message, "body": body})

        await self.app(scope, receive, compressing_send)
