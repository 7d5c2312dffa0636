"""The inference hot path, ``POST /v2/models/{m}[/versions/{v}]/infer``, with one owner.

Everything a gateway does to an inference request happens here as plain calls, in the
order the middleware chain applies to every other route: request id, payload capture,
tracing, access log, auth, rate limit, body limit, the inference itself
(``InferenceService``), gzip. The answer is built as a value and sent once at the end,
so no layer wraps ``send`` or ``receive`` and no layer awaits the next (a chain adds a
coroutine per layer and a wrapped ``send`` for most). Every other request goes to the
Starlette app and its middleware (``serving.http.app``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from serving.auth import AccessControl
from serving.auth.scopes import INFER
from serving.errors import FermionError
from serving.http.capture import PayloadCapture
from serving.http.connection import CANCEL_ON_DISCONNECT, DISCONNECTED, RESPOND
from serving.http.middleware.access_log import access_record
from serving.http.middleware.auth import authorize
from serving.http.middleware.body_limit import declared_over, read_past
from serving.http.middleware.compression import gzip_answer, wants_gzip
from serving.http.middleware.request_id import REQUEST_ID, start_request
from serving.http.middleware.tracing import end_request_span, start_request_span
from serving.http.responses import Answer, RejectHook, error_answer
from serving.inference.codec import HttpInferBody
from serving.inference.limits import RateLimiter, caller_key
from serving.inference.service import InferCall, InferenceService
from serving.observability.tracing import (
    current_tracer,
    mark_sampled_out,
    unmark_sampled_out,
)

__all__ = ["INFER_ROUTES", "AccessSink", "InferPath"]

log = logging.getLogger("fermion.gateway")

#: The route templates of inference, without and with a version (as spans name them).
INFER_ROUTES: Final = ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer")

_NONE: Final[dict[str, Any]] = {}

#: Where access lines go (``emit_access``: the ``fermion.access`` logger).
AccessSink = Callable[[dict[str, Any]], None]


class InferPath:
    """Answers V2 inference requests, every gateway feature applied, without middleware.

    ``access`` (None: auth off) admits the request unless its path is one of
    ``public_paths``; ``limiter`` (None: no rate limits) takes its token, a refusal
    counted through ``on_reject``, like a body over ``max_bytes`` refused from its
    Content-Length; ``access_log`` gets one line per request; ``capture`` keeps a share
    of requests with their answers. Tracing follows the tracer configured when the
    path is built (``serving.observability.tracing``).
    """

    def __init__(
        self,
        service: InferenceService[Any],
        *,
        max_body_bytes: int,
        access: AccessControl | None = None,
        public_paths: frozenset[str] = frozenset(),
        limiter: RateLimiter | None = None,
        on_reject: RejectHook | None = None,
        access_log: AccessSink | None = None,
        capture: PayloadCapture | None = None,
    ) -> None:
        self._service = service
        self._max_bytes = max_body_bytes
        self._access = access
        self._public = public_paths
        self._limiter = limiter
        self._on_reject = on_reject
        self._access_log = access_log
        self._capture = capture
        self._tracer = current_tracer()

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, model: str, version: str | None
    ) -> None:
        """Answer the request of ``scope`` for ``model`` (``version``: the one its path
        names); a method other than POST is admitted, then answered 405."""
        request_id = start_request(scope)
        post = scope["method"] == "POST"  # another method is answered 405
        capture = self._capture
        exchange = capture.start() if capture is not None and post else None
        if exchange is not None:
            receive = exchange.receive(receive)
        traced = None
        unsampled = None
        if self._tracer is not None:
            route = INFER_ROUTES[version is not None] if post else None  # 405: no route
            traced = start_request_span(self._tracer, scope, route=route)
            if traced is None:
                unsampled = mark_sampled_out()
        started = time.perf_counter_ns()
        answer: Answer | None = None
        status = 0  # of the answer sent (0: none)
        escaped: BaseException | None = None
        try:
            answer = await self._answer(scope, receive, model, version)
            if answer is not None:
                status = answer.status
                headers = [*answer.headers, (REQUEST_ID, request_id)]
                respond = (scope.get("extensions") or _NONE).get(RESPOND) if post else None
                if respond is not None:
                    await respond(status, headers, answer.body)  # one call, one write
                else:
                    start = {"type": "http.response.start", "status": status, "headers": headers}
                    await send(start)
                    await send({"type": "http.response.body", "body": answer.body})
        except BaseException as e:
            escaped = e
            raise
        finally:
            # As the middleware report it: 500 for a request that got no answer.
            reported = status or 500
            if self._access_log is not None:
                self._access_log(access_record(scope, reported, started))
            if traced is not None:
                end_request_span(traced, reported, escaped)
            elif unsampled is not None:
                unmark_sampled_out(unsampled)
            if exchange is not None:
                exchange.finish(scope, answer if status else None)

    async def _answer(
        self, scope: Scope, receive: Receive, model: str, version: str | None
    ) -> Answer | None:
        """The answer to send (None: the client went, nobody is left to answer)."""
        try:
            post = scope["method"] == "POST"
            if self._access is not None and scope["path"] not in self._public:
                # (Another method needs what its path does: required_scope says.)
                authorize(self._access, scope, (INFER, model) if post else None)
            if not post:
                return error_answer(_MethodNotAllowed(scope["method"], scope["path"]))
            if self._limiter is not None:
                await self._take_token(scope, model)
            refused = declared_over(scope, self._max_bytes)
            if refused is not None:
                if self._on_reject is not None:
                    self._on_reject(model, "too_large")
                return error_answer(refused)
        except FermionError as e:
            return error_answer(e)
        except Exception:
            log.exception("unhandled error admitting %s", scope["path"])
            return error_answer(FermionError("internal server error"))
        answer = await self._infer(scope, receive, model, version)
        if answer is not None and wants_gzip(scope):
            headers, body = await gzip_answer(answer.headers, answer.body)
            answer = Answer(answer.status, headers, body)
        return answer

    async def _take_token(self, scope: Scope, model: str) -> None:
        assert self._limiter is not None
        principal = scope.get("state", {}).get("principal")
        client = scope.get("client")
        caller = caller_key(principal.name if principal is not None else None, client and client[0])
        await self._limiter.check(caller, model, self._on_reject)

    async def _infer(
        self, scope: Scope, receive: Receive, model: str, version: str | None
    ) -> Answer | None:
        state = scope["state"]
        # The connection cancels this task if its client goes: a request still queued
        # then leaves its queue and is never computed.
        state[CANCEL_ON_DISCONNECT] = True
        headers = Headers(scope=scope)
        service = self._service
        call = InferCall(
            model=model,
            version=version,
            headers=headers,
            body=HttpInferBody(
                _body_reader(receive, self._max_bytes), headers, service.max_body_bytes
            ),
            started_ns=time.perf_counter_ns(),
            state=state,
        )
        try:
            content, answer_headers = await service.infer(call)
        except (ClientDisconnect, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError):
                task = asyncio.current_task()
                if task is None or task.cancelling() == 0 or not _gone(e):
                    raise
                task.uncancel()  # nobody is left to answer: end quietly
            return None
        except FermionError as e:
            return error_answer(e)
        except Exception:
            log.exception("unhandled error on %s", scope["path"])
            return error_answer(FermionError("internal server error"))
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer_headers.items()]
        raw.append((b"content-length", str(len(content)).encode()))
        return Answer(200, raw, content)


class _MethodNotAllowed(FermionError):
    """An infer path asked with another method than POST (405, ``Allow: POST``)."""

    status_code = 405

    def __init__(self, method: str, path: str) -> None:
        super().__init__(f"method {method} is not allowed on {path}: inference takes POST")

    def headers(self) -> dict[str, str]:
        return {"Allow": "POST"}


def _gone(error: asyncio.CancelledError) -> bool:
    """True when ``error`` is the connection's cancel for a client that disconnected."""
    return bool(error.args) and error.args[0] == DISCONNECTED


def _body_reader(receive: Receive, limit: int) -> Callable[[], Awaitable[bytes]]:
    """Reads the whole request body from ``receive`` when called (413 past ``limit``).

    It counts the bytes itself rather than through the body-limit middleware's wrapped
    ``receive``: a coroutine less per message on the inference path.
    """

    async def read() -> bytes:
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                raise read_past(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    return read
