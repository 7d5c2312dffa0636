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

from starlette.types import Message, Receive, Scope

from serving.http.responses import Answer
from serving.observability.capture import CapturedBody, CaptureWriter

__all__ = ["CREDENTIAL_HEADERS", "CapturedExchange", "PayloadCapture", "RawHeaders"]

#: An ASGI message's headers.
RawHeaders = Iterable[tuple[bytes, bytes]]

#: Headers never written to a capture (credentials); configuration may add more.
CREDENTIAL_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key"}
)

log = logging.getLogger("fermion.capture")


def _headers(raw: RawHeaders, drop: frozenset[str]) -> list[list[str]]:
    out = []
    for key, value in raw:
        name = key.decode("latin-1").lower()
        if name not in drop:
            out.append([name, value.decode("latin-1")])
    return out


class PayloadCapture:
    """Hands a sampled share of inference requests, answered, to ``writer``."""

    def __init__(
        self,
        writer: CaptureWriter,
        *,
        percent: float,
        max_body_bytes: int,
        responses: bool = True,
        redact_headers: Iterable[str] = (),
        sample: Callable[[], float] = random.random,
    ) -> None:
        self._writer = writer
        self._share = percent / 100.0
        self._cap = max_body_bytes
        self._responses = responses
        self._drop = CREDENTIAL_HEADERS | {h.lower() for h in redact_headers}
        self._sample = sample

    def start(self) -> CapturedExchange | None:
        """A new inference request's capture, if it is sampled (None otherwise)."""
        if self._sample() >= self._share:
            return None
        return CapturedExchange(self)

    def _record(
        self, exchange: CapturedExchange, scope: Scope, status: int, headers: RawHeaders
    ) -> dict[str, Any]:
        state = scope.get("state", {})
        served = state.get("served")
        record: dict[str, Any] = {
            "ts": exchange.arrived,
            "request_id": state.get("request_id"),
            "method": scope["method"],
            "path": scope["path"],
            "query": scope.get("query_string", b"").decode("latin-1"),
            "headers": _headers(scope["headers"], self._drop),
            "body": exchange.request,
            "status": status,
            "response_headers": _headers(headers, self._drop),
            "latency_ms": round((time.perf_counter_ns() - exchange.started_ns) / 1e6, 3),
            "model": served[0] if served else None,
            "version": str(served[1]) if served else None,
        }
        if self._responses:
            record["response"] = exchange.answer
        return record


class CapturedExchange:
    """One sampled request: its body as it is read, then its answer."""

    __slots__ = ("_capture", "answer", "arrived", "request", "started_ns")

    def __init__(self, capture: PayloadCapture) -> None:
        self._capture = capture
        self.arrived = time.time()
        self.started_ns = time.perf_counter_ns()
        self.request = CapturedBody(capture._cap)
        self.answer = CapturedBody(capture._cap)

    def receive(self, receive: Receive) -> Receive:
        """``receive``, keeping the request body by reference as it passes."""

        async def receive_body() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.request.add(message.get("body", b""))
            return message

        return receive_body

    def finish(self, scope: Scope, sent: Answer | None) -> None:
        """Hand the record to the writer, with the answer ``sent`` (None: none was, and
        the record's status is 0). Never raises."""
        capture = self._capture
        try:
            if sent is not None and capture._responses:
                self.answer.add(sent.body)
            status, headers = (sent.status, sent.headers) if sent is not None else (0, [])
            capture._writer.submit(capture._record(self, scope, status, headers))
        except Exception:  # a lost record, never a failed request
            log.debug("capture: record not built", exc_info=True)
