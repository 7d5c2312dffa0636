"""Sampled payload capture: a share of inference requests, with their answers and timings.

For ``percent`` of ``POST .../infer`` requests, the request (headers without
credentials, body), the answer (status, headers, body) and the time taken are handed to
a ``CaptureWriter`` after the answer has been sent; ``fermion loadtest replay`` sends
them again with their original spacing. Bodies over ``max_body_bytes`` are recorded
without their bytes. Nothing here can fail or delay a request: the body is kept by
reference as it passes (the writer's thread joins and encodes it), and any problem
building the record only loses the record.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.observability.capture import CapturedBody, CaptureWriter
from serving.protocol import parse_infer_path

__all__ = ["CREDENTIAL_HEADERS", "CaptureMiddleware"]

#: Headers never written to a capture (credentials); configuration may add more.
CREDENTIAL_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key"}
)

log = logging.getLogger("fermion.capture")


def _headers(raw: Iterable[tuple[bytes, bytes]], drop: frozenset[str]) -> list[list[str]]:
    out = []
    for key, value in raw:
        name = key.decode("latin-1").lower()
        if name not in drop:
            out.append([name, value.decode("latin-1")])
    return out


class CaptureMiddleware:
    """Hands a sampled share of inference requests, answered, to ``writer``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        writer: CaptureWriter,
        percent: float,
        max_body_bytes: int,
        responses: bool = True,
        redact_headers: Iterable[str] = (),
        sample: Callable[[], float] = random.random,
    ) -> None:
        self.app = app
        self._writer = writer
        self._share = percent / 100.0
        self._cap = max_body_bytes
        self._responses = responses
        self._drop = CREDENTIAL_HEADERS | {h.lower() for h in redact_headers}
        self._sample = sample

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or self._sample() >= self._share
            or parse_infer_path(scope["path"]) is None
        ):
            await self.app(scope, receive, send)
            return
        arrived = time.time()
        started = time.perf_counter_ns()
        request, answer = CapturedBody(self._cap), CapturedBody(self._cap)
        response: dict[str, Any] = {"status": 0, "headers": []}

        async def receive_body() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                request.add(message.get("body", b""))
            return message

        async def send_answer(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                response["headers"] = message.get("headers", [])
            elif message["type"] == "http.response.body" and self._responses:
                answer.add(message.get("body", b""))

        try:
            await self.app(scope, receive_body, send_answer)
        finally:
            try:
                self._writer.submit(
                    self._record(scope, arrived, started, request, answer, response)
                )
            except Exception:  # a lost record, never a failed request
                log.debug("capture: record not built", exc_info=True)

    def _record(
        self,
        scope: Scope,
        arrived: float,
        started: int,
        request: CapturedBody,
        answer: CapturedBody,
        response: dict[str, Any],
    ) -> dict[str, Any]:
        state = scope.get("state", {})
        served = state.get("served")
        record: dict[str, Any] = {
            "ts": arrived,
            "request_id": state.get("request_id"),
            "method": scope["method"],
            "path": scope["path"],
            "query": scope.get("query_string", b"").decode("latin-1"),
            "headers": _headers(scope["headers"], self._drop),
            "body": request,
            "status": response["status"],
            "response_headers": _headers(response["headers"], self._drop),
            "latency_ms": round((time.perf_counter_ns() - started) / 1e6, 3),
            "model": served[0] if served else None,
            "version": str(served[1]) if served else None,
        }
        if self._responses:
            record["response"] = answer
        return record
