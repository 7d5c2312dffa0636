"""The status of the response an ASGI app sends, for middleware that reports it."""

from __future__ import annotations

from starlette.types import Message, Send

__all__ = ["ResponseStatus"]


class ResponseStatus:
    """Wraps ``send``: passes every message on and keeps the response's status.

    ``status`` stays 500 until a response starts, so an app that fails before
    answering is reported as the error the server then sends.
    """

    __slots__ = ("_send", "status")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 500

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)
