"""Responses outside Starlette's handlers: V2 error bodies and JSON, sent by pure ASGI."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Send

from serving.auth.access import RejectHook
from serving.errors import FermionError
from serving.inference.codec import encode_error

__all__ = ["RejectHook", "json_response", "send_error"]


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


def json_response(data: Any, status_code: int = 200) -> Response:
    """``data`` as a JSON response (orjson), for a Starlette handler."""
    return Response(orjson.dumps(data), status_code=status_code, media_type="application/json")
