"""What every gRPC call goes through, as an HTTP request goes through the middleware.

The W3C ``traceparent`` in the metadata continued by a server span, the credential
checked for the scope the method needs (``serving.auth.AccessControl``, as over HTTP),
the caller's rate limit for inference (``RateLimiter.check``), and a Fermion error
turned into its gRPC status (``serving.grpc.status``) with its message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import grpc
from opentelemetry.trace import Status, StatusCode, Tracer

from serving.auth.access import API_KEY, AUTHORIZATION, AccessControl, RejectHook, credential
from serving.auth.scopes import INFER, OPEN
from serving.errors import FermionError
from serving.grpc.status import status_of, trailers_of
from serving.inference.limits import RateLimiter, caller_key
from serving.observability.tracing import (
    PROPAGATOR,
    detach,
    make_current,
    mark_sampled_out,
    new_root,
    start_server_span,
    unmark_sampled_out,
)

__all__ = ["SERVICE", "Call", "CallGate", "Context", "Handler", "metadata_of"]

log = logging.getLogger("fermion.grpc")

#: The full name of the gRPC service.
SERVICE: Final = "inference.GRPCInferenceService"
_REQUEST_ID: Final = "x-request-id"
_CARRIER: Final = ("traceparent", "tracestate")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
#: The servicer context of a call.
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(slots=True)
class Call:
    """One admitted call as its handler sees it."""

    context: Context
    #: ``time.perf_counter_ns()`` when the call was taken.
    started_ns: int
    #: Text metadata, lower-case keys (binary ``-bin`` entries left out).
    metadata: dict[str, str]
    #: Trailing metadata sent with the answer (the gate adds ``x-request-id``).
    trailers: list[tuple[str, str]] = field(default_factory=list)
    #: The status the call ends with.
    status: grpc.StatusCode = grpc.StatusCode.OK


#: Answers one admitted call.
Handler = Callable[[Req, Call], Awaitable[Resp]]


def metadata_of(context: Context) -> dict[str, str]:
    """The call's text metadata as a dict (binary ``-bin`` entries left out)."""
    return {
        key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
    }


def _peer_host(peer: str) -> str | None:
    """The address of ``ipv4:1.2.3.4:5678`` or ``ipv6:[::1]:5678`` (None otherwise)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    return rest.rpartition(":")[0].strip("[]") or None


class CallGate:
    """Admits (or refuses) each call and answers a Fermion error with its gRPC status."""

    def __init__(
        self,
        *,
        access: AccessControl | None,
        limiter: RateLimiter | None,
        on_reject: RejectHook | None,
        tracer: Tracer | None,
    ) -> None:
        self._access = access
        self._limiter = limiter
        self._on_reject = on_reject
        self._tracer = tracer

    async def _admit(self, call: Call, kind: str, model: str) -> None:
        principal = None
        metadata = call.metadata
        if self._access is not None and kind != OPEN:
            token = credential(metadata.get(AUTHORIZATION), metadata.get(API_KEY))
            principal = self._access.check(token, kind, model)
        if kind == INFER and self._limiter is not None:
            caller = caller_key(
                principal.name if principal is not None else None,
                _peer_host(call.context.peer()),
            )
            await self._limiter.check(caller, model, self._on_reject)

    async def run(
        self,
        method: str,
        kind: str,
        model: str,
        handler: Handler[Req, Resp],
        request: Req,
        context: Context,
    ) -> Resp:
        """``handler``'s answer, once the call is admitted for ``kind`` (on ``model``).

        A FermionError (from admission or the handler) aborts the call with its status,
        message and headers (``retry-after``) as trailing metadata; any other error is
        logged and answered INTERNAL.
        """
        call = Call(context, time.perf_counter_ns(), metadata_of(context))
        request_id = call.metadata.get(_REQUEST_ID)
        if request_id is not None:
            call.trailers.append((_REQUEST_ID, request_id[:128]))
        if self._tracer is None:
            return await self._answer(method, kind, model, handler, request, call)
        carrier = {k: call.metadata[k] for k in _CARRIER if k in call.metadata}
        parent = PROPAGATOR.extract(carrier) if carrier else None
        root = 0
        if parent is None:
            # Sampled first: a call sampled out builds no span (see TracingMiddleware).
            root, recorded = new_root()
            if not recorded:
                unsampled = mark_sampled_out()
                try:
                    return await self._answer(method, kind, model, handler, request, call)
                finally:
                    unmark_sampled_out(unsampled)
        span = start_server_span(
            self._tracer,
            f"{SERVICE}/{method}",
            parent=parent,
            root=root,
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method},
        )
        if request_id is not None:
            span.set_attribute("fermion.request_id", request_id[:128])
        token = make_current(span, parent)
        code = grpc.StatusCode.CANCELLED
        try:
            response = await self._answer(method, kind, model, handler, request, call)
            code = grpc.StatusCode.OK
            return response
        except grpc.aio.AbortError:
            code = call.status
            raise
        finally:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT):
                span.set_status(Status(StatusCode.ERROR))
            detach(token)
            span.end()

    async def _answer(
        self,
        method: str,
        kind: str,
        model: str,
        handler: Handler[Req, Resp],
        request: Req,
        call: Call,
    ) -> Resp:
        try:
            await self._admit(call, kind, model)
            response = await handler(request, call)
        except FermionError as e:
            error = e
        except Exception:
            log.exception("unhandled error in %s", method)
            error = FermionError("internal server error")
        else:
            if call.trailers:
                call.context.set_trailing_metadata(tuple(call.trailers))
            return response
        call.status = status_of(error)
        trailers = (*trailers_of(error), *call.trailers)
        await call.context.abort(call.status, error.message, trailers)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover
