"""One JSON access log line per request: request id, trace id, key name, model, status, latency."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.http.response_status import ResponseStatus

__all__ = [
    "ACCESS_LOGGER",
    "AccessLogMiddleware",
    "access_record",
    "configure_access_logger",
    "emit_access",
]

#: The logger access lines go to, one JSON object per line.
ACCESS_LOGGER = "fermion.access"

_log = logging.getLogger(ACCESS_LOGGER)


def emit_access(record: dict[str, Any]) -> None:
    """Write ``record`` as one line to the ``fermion.access`` logger."""
    _log.info(orjson.dumps(record).decode())


def access_record(scope: Scope, status: int, started_ns: int) -> dict[str, Any]:
    """The access line of the request of ``scope``, answered with ``status``.

    The key's name (never the key), the model and version served and the trace id
    come from ``scope["state"]``, filled by the auth, route and tracing layers;
    ``started_ns`` is ``time.perf_counter_ns()`` when the request was taken.
    """
    state = scope.get("state", {})
    principal = state.get("principal")
    served = state.get("served")
    client = scope.get("client")
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "request_id": state.get("request_id"),
        "trace_id": state.get("trace_id"),
        "key": principal.name if principal is not None else None,
        "client": client[0] if client else None,
        "method": scope["method"],
        "path": scope["path"],
        "model": served[0] if served else None,
        "version": str(served[1]) if served else None,
        "status": status,
        "latency_ms": round((time.perf_counter_ns() - started_ns) / 1e6, 3),
    }


def configure_access_logger(stream: TextIO | None = None) -> None:
    """Send access lines to ``stream`` (stderr) as bare JSON, apart from other logs."""
    if _log.handlers:
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False


class AccessLogMiddleware:
    """Writes one record per HTTP request (``access_record``) to ``sink`` (the
    ``fermion.access`` logger)."""

    def __init__(
        self, app: ASGIApp, *, sink: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.app = app
        self._sink = sink or emit_access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter_ns()
        response = ResponseStatus(send)
        try:
            await self.app(scope, receive, response)
        finally:
            self._sink(access_record(scope, response.status, started))
