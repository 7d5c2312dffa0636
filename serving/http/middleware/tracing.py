"""Tracing: one server span per HTTP request, continuing an incoming W3C ``traceparent``.

Spans follow OpenTelemetry's HTTP semantic conventions: named ``{method} {http.route}``
(the route template, never the raw path, so names stay bounded), with the request's
method, route, path, scheme, server and client addresses, user agent and status; an
error answer (>= 400) gets ``error.type`` (its status code) and no stack trace, and a
server error (>= 500) the span status ERROR. Only an exception that escapes the app
(a bug) is recorded with its trace.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import Token
from typing import Any, NamedTuple

from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.http.response_status import ResponseStatus
from serving.observability.tracing import (
    PROPAGATOR,
    detach,
    make_current,
    new_root,
    start_server_span,
)

__all__ = [
    "RequestSpan",
    "TracingMiddleware",
    "end_request_span",
    "route_template",
    "start_request_span",
]

_CARRIER_HEADERS = (b"traceparent", b"tracestate")
_USER_AGENT = b"user-agent"
_MAX_USER_AGENT = 256


def route_template(routes: Iterable[BaseRoute], scope: Scope) -> str | None:
    """The template of the route that serves ``scope`` (``/v2/models/{model}/infer``)."""
    for route in routes:
        match, child = route.matches(scope)
        if match is not Match.FULL:
            continue
        if isinstance(route, Mount):
            inner = route_template(route.routes, {**scope, **child})
            return None if inner is None else route.path + inner
        path: str | None = getattr(route, "path", None)
        return path
    return None


def _attributes(scope: Scope, method: str, path: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.path": path,
        "url.scheme": scope.get("scheme", "http"),
        "network.protocol.version": scope.get("http_version", "1.1"),
    }
    server = scope.get("server")
    if server:
        attributes["server.address"] = server[0]
        if server[1] is not None:
            attributes["server.port"] = server[1]
    client = scope.get("client")
    if client:
        attributes["client.address"] = client[0]
    for key, value in scope["headers"]:
        if key == _USER_AGENT:
            attributes["user_agent.original"] = value[:_MAX_USER_AGENT].decode("latin-1")
            break
    return attributes


class RequestSpan(NamedTuple):
    """A request's server span, current until ``end_request_span``."""

    span: Span
    token: Token[Context]


def start_request_span(
    tracer: Tracer, scope: Scope, *, route: str | None = None
) -> RequestSpan | None:
    """The server span of an HTTP request, made current; None for one sampled out.

    ``route``: the template of the route serving it, when the caller knows it; else it
    is looked up in the app's router.

    The trace id is left in ``scope["state"]["trace_id"]`` for the access log. A request
    that starts a trace is sampled before anything else: one sampled out gets its trace
    id and no span (at a 1% ratio, 99 requests in 100 pay for a random number only).
    """
    carrier: dict[str, str] = {}
    for key, value in scope["headers"]:
        if key in _CARRIER_HEADERS:
            carrier[key.decode()] = value.decode("latin-1")
    parent = PROPAGATOR.extract(carrier) if carrier else None
    state = scope.setdefault("state", {})
    root = 0
    if parent is None:
        root, recorded = new_root()
        if not recorded:
            state["trace_id"] = format(root, "032x")
            return None
    method, path = scope["method"], scope["path"]
    if route is None:
        app = scope.get("app")
        route = route_template(app.router.routes, scope) if app is not None else None
    attributes = _attributes(scope, method, path)
    if route is not None:
        attributes["http.route"] = route
    span = start_server_span(
        tracer,
        f"{method} {route}" if route is not None else method,
        parent=parent,
        root=root,
        attributes=attributes,
    )
    ctx = span.get_span_context()
    if ctx.is_valid:
        state["trace_id"] = format(ctx.trace_id, "032x")
    if "request_id" in state:
        span.set_attribute("fermion.request_id", state["request_id"])
    return RequestSpan(span, make_current(span, parent))


def end_request_span(traced: RequestSpan, status: int, escaped: BaseException | None) -> None:
    """End the request's span with its response ``status`` (500 when none was sent) and
    the exception that escaped the app, if one did (recorded with its trace)."""
    span = traced.span
    if escaped is not None:
        span.record_exception(escaped)
    span.set_attribute("http.response.status_code", status)
    if escaped is not None or status >= 400:
        span.set_attribute("error.type", type(escaped).__qualname__ if escaped else str(status))
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    detach(traced.token)
    span.end()


class TracingMiddleware:
    """One server span per HTTP request (``start_request_span``), continuing an incoming
    W3C ``traceparent``."""

    def __init__(self, app: ASGIApp, *, tracer: Tracer) -> None:
        self.app = app
        self._tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        traced = start_request_span(self._tracer, scope)
        if traced is None:
            await self.app(scope, receive, send)
            return
        response = ResponseStatus(send)
        escaped: BaseException | None = None
        try:
            await self.app(scope, receive, response)
        except BaseException as e:
            escaped = e
            raise
        finally:
            end_request_span(traced, response.status, escaped)
