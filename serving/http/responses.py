"""Responses outside Starlette's handlers: V2 error bodies and JSON, sent by pure ASGI."""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson
from starlette.responses import Response
from starlette.types import Send

from serving.auth.access import RejectHook
from serving.errors import FermionError
from serving.inference.codec import encode_error

__all__ = ["Answer", "RejectHook", "error_answer", "json_response", "send_error"]


class Answer(NamedTuple):
    """A whole HTTP answer: status, headers (as ASGI sends them) and body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def error_answer(error: FermionError) -> Answer:
    """``error`` as a V2 error body, with its status and headers (``retry-after``)."""
    body = encode_error(error.message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers().items()),
    ]
    return Answer(error.status_code, headers, body)


async def send_error(send: Send, error: FermionError) -> None:
    """Answer with ``error`` as a V2 error body, from middleware outside the app's handlers."""
    status, headers, body = error_answer(error)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def json_response(data: Any, status_code: int = 200) -> Response:
    """``data`` as a JSON response (orjson), for a Starlette handler."""
    return Response(orjson.dumps(data), status_code=status_code, media_type="application/json")
