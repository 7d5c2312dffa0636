"""Tracing: one server span per HTTP request, continuing an incoming W3C ``traceparent``."""

from __future__ import annotations

from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.http.response_status import ResponseStatus
from serving.observability.tracing import PROPAGATOR

__all__ = ["TracingMiddleware"]

_CARRIER_HEADERS = (b"traceparent", b"tracestate")


class TracingMiddleware:
    """One server span per HTTP request, continuing an incoming W3C ``traceparent``.

    The trace id is left in ``scope["state"]["trace_id"]`` for the access log.
    """

    def __init__(self, app: ASGIApp, *, tracer: Tracer) -> None:
        self.app = app
        self._tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier: dict[str, str] = {}
        for key, value in scope["headers"]:
            if key in _CARRIER_HEADERS:
                carrier[key.decode()] = value.decode("latin-1")
        parent = PROPAGATOR.extract(carrier) if carrier else None
        method, path = scope["method"], scope["path"]
        state = scope.setdefault("state", {})
        span = self._tracer.start_span(
            f"{method} {path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        )
        ctx = span.get_span_context()
        if ctx.is_valid:
            state["trace_id"] = format(ctx.trace_id, "032x")
        if "request_id" in state:
            span.set_attribute("fermion.request_id", state["request_id"])
        token = context.attach(trace.set_span_in_context(span, parent))
        response = ResponseStatus(send)
        try:
            await self.app(scope, receive, response)
        except BaseException as e:
            span.record_exception(e)
            raise
        finally:
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            context.detach(token)
            span.end()
