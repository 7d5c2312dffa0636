"""HTTP/1.1 connections with limits a hostile client cannot get around.

uvicorn's httptools protocol buffers a request head without bound (a 50 MB header
costs 50 MB before any middleware runs), waits forever for the rest of a head or a
body, answers protocol errors in plain text and computes requests whose client has
gone. ``GuardedHttpProtocol`` is that protocol with, before any application work:

- a limit on the bytes of a request head (request line and headers) and on its
  header count: 431, counted as the bytes arrive, so at most one read past the limit
  is ever buffered;
- a header timeout: a connection must deliver a whole head within it, from its
  opening or from the first byte of its next request (408, then closed; an idle
  new connection is simply closed);
- a body timeout: the longest pause while a body is read (408, then closed);
- V2 error bodies (``{"error": ...}``) for its own refusals and for malformed requests;
- draining (``DrainState``): every response closes its connection;
- a response sent before its body was read whole closes the connection, so a client
  cannot hold it by trickling the rest of a body nobody reads;
- an inference request its model's queue would refuse now (``Refuser``: full, or
  past the request's deadline) is answered 503 with Retry-After from its head alone,
  without a task, the middleware or reading its body: under overload, refusing must
  cost far less than serving, or refusals eat the capacity (this is before
  authentication: an overloaded model answers 503 where it would answer 401);
- a request whose handler marked it ``CANCEL_ON_DISCONNECT`` in ``scope["state"]``
  has its task cancelled when the client disconnects, so a queued inference request
  whose client left is never computed;
- a response whose length is known goes out in one write, its head with its body's
  first bytes (uvicorn writes the head alone: a second syscall, a second segment and a
  second wake-up of the client for every response);
- a whole answer can be given at once, without ASGI's two messages: the request's
  ``scope["extensions"][RESPOND]`` (``Responder``) writes status, headers and body in
  one write, with less work than the two ``send`` calls (the inference path's);
- one keep-alive timer per idle stretch of a connection, not per request: uvicorn arms
  a timer after every response and cancels it at the next request's first bytes. Here
  the timer stays armed across requests and, when it fires, closes the connection only
  if it has been idle for the whole timeout since its last response (else it waits for
  the rest, or for the next response when a request is under way).
"""

from __future__ import annotations

import asyncio
import contextvars
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast

import httptools
from starlette.datastructures import Headers
from uvicorn.protocols.http.httptools_impl import (
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from serving.errors import FermionError
from serving.http.drain import DrainState
from serving.http.middleware.request_id import request_id_of
from serving.inference.codec import encode_error
from serving.protocol import parse_infer_path

__all__ = [
    "CANCEL_ON_DISCONNECT",
    "DISCONNECTED",
    "RESPOND",
    "ConnectionLimits",
    "GuardedHttpProtocol",
    "Refuser",
    "Responder",
    "guarded_protocol",
]

#: The ``scope["state"]`` key a handler sets to have its task cancelled on disconnect.
CANCEL_ON_DISCONNECT = "fermion.cancel_on_disconnect"
#: The message of that cancellation.
DISCONNECTED = "the client disconnected"
#: The ``scope["extensions"]`` key of a request's ``Responder``.
RESPOND = "fermion.respond"

#: ``await respond(status, headers, body)``: the whole answer to a request, in one write.
#: ``headers`` are ASGI's (bytes pairs, names lowercase) and must carry the body's
#: ``content-length``; the server's default headers (date, server) are added.
Responder = Callable[[int, list[tuple[bytes, bytes]], bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one connection may send and how slowly (``server.*`` keys of the config)."""

    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0


class Refuser(Protocol):
    """What refuses overloaded requests from their head (``InferenceService``)."""

    def refusing(self) -> bool:
        """Cheap: True while requests are being refused (only then is ``refusal`` asked)."""

    def refusal(
        self, model: str, version: str | None, headers: Mapping[str, str]
    ) -> FermionError | None:
        """The 503 a request for ``model`` would get from its queue now, else None."""


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the refusal is on the protocol."""


def _head_start(status: int, defaults: list[tuple[bytes, bytes]]) -> list[bytes]:
    """A response head's status line and the server's default headers (date, server),
    as pieces to join; the caller adds its own headers and the blank line."""
    head = [STATUS_LINE[status]]
    for name, value in defaults:
        head += (name, b": ", value, b"\r\n")
    return head


class _HeldHead:
    """A cycle's transport while its response head waits for the body's first write."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self.head
        if head is None:
            self.head = data  # the head, written by the response start
            return
        self.head = b""
        self.transport.write(head + data if head else data)

    def flush(self) -> None:
        if self.head:
            self.transport.write(self.head)
        self.head = b""

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _OneWriteCycle(RequestResponseCycle):
    """uvicorn's request cycle, writing a response of known length in one write."""

    async def send(self, message: Any) -> None:
        transport: Any = self.transport
        held = transport if type(transport) is _HeldHead else None
        if held is None and message["type"] == "http.response.start" and not self.response_started:
            held = _HeldHead(self.transport)
            self.transport = held  # type: ignore[assignment]
            try:
                await super().send(message)
            except BaseException:
                self._release(held)
                raise
            if held.head is None or self.chunked_encoding is not False:
                self._release(held)  # nothing written, or a stream: its head goes now
            return
        try:
            await super().send(message)
        finally:
            if held is not None:
                self._release(held)

    def _release(self, held: _HeldHead) -> None:
        self.transport = held.transport
        held.flush()

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """The ``Responder``: what ``send``'s start and body messages do, in one call.

        As ``send`` does: waits while the transport's buffer is full, does nothing once
        the client is gone, refuses a header value with a control character, keeps the
        connection's keep-alive (``connection: close`` among ``headers`` or the
        connection's own state closes it after the answer) and starts the next pipelined
        request. Not for a HEAD request (its body is never sent) nor with uvicorn's own
        access log on (``send`` writes its line).
        """
        if self.access_log or self.scope["method"] == "HEAD":
            await self.send({"type": "http.response.start", "status": status, "headers": headers})
            await self.send({"type": "http.response.body", "body": body})
            return
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if self.response_started:
            raise RuntimeError("respond() after the response was started")
        content = _head_start(status, self.default_headers)
        length = -1
        close = False
        for name, value in headers:
            if HEADER_VALUE_RE.search(value):
                raise RuntimeError("Invalid HTTP header value.")
            name = name.lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = b"close" in [token.lower().strip() for token in value.split(b",")]
            content += (name, b": ", value, b"\r\n")
        if length != len(body):
            raise RuntimeError(f"content-length {length} for a body of {len(body)} bytes")
        self.response_started = True
        self.waiting_for_100_continue = False
        if close:
            self.keep_alive = False
        elif not self.keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"\r\n", body)
        self.transport.write(b"".join(content))
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()


class _Respond:
    """A request's ``Responder``: its cycle's ``respond``, the cycle held weakly.

    The cycle holds the scope that holds this: a strong reference would make a loop of
    every request's objects, which only the garbage collector frees (in pauses of tens
    of milliseconds once enough requests have piled up). The cycle lives as long as the
    task that answers, and so as long as anyone can call this.
    """

    __slots__ = ("_cycle",)

    def __init__(self, cycle: _OneWriteCycle) -> None:
        self._cycle = weakref.ref(cycle)

    def __call__(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Awaitable[None]:
        cycle = self._cycle()
        if cycle is None:
            raise RuntimeError("the request's cycle is gone")
        return cycle.respond(status, headers, body)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head limits, read timeouts and draining."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    drain: ClassVar[DrainState] = DrainState()
    refuser: ClassVar[Refuser | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._keep_alive = True
        self._refusal: tuple[int, str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._discarding = False  # the body of a request refused from its head
        self._completed = 0  # requests read whole on this connection
        #: When the connection last went idle (loop time); None while a request is on.
        self._idle_since: float | None = None

    # -- connection ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        task = self._task
        super().connection_lost(exc)
        for timer in (self._head_timer, self._body_timer, self.timeout_keep_alive_task):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self.timeout_keep_alive_task = None
        if (
            task is not None
            and not task.done()
            and cycle is not None
            and not cycle.response_complete
            and cycle.scope.get("state", {}).get(CANCEL_ON_DISCONNECT)
        ):
            task.cancel(msg=DISCONNECTED)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            limit = self.limits.max_header_bytes
            self._head_bytes += len(data)
            if self._head_bytes > limit:
                # Feed only what fits: the head must end within it.
                room = max(0, len(data) - (self._head_bytes - limit))
                completed = self._completed
                self._feed(data[:room])
                if self.transport.is_closing():
                    return
                if self._in_head and self._completed == completed:
                    self._refuse(431, f"request head over the limit of {limit} bytes")
                    return
                if self._in_head:  # a pipelined request began: its head counts afresh
                    self.data_received(data[room:])
                    return
                data = data[room:]
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        if data:
            super().data_received(data)
        if self.transport.is_closing():
            return
        if self._in_head:
            if self._head_timer is None and self._head_bytes:
                self._arm_head_timer()
            return
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not cycle.response_complete:
            self._last_read = self.loop.time()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(
                    self.limits.body_timeout_s, self._body_timeout
                )

    # -- parser callbacks ----------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if len(self.headers) > self.limits.max_headers:
            # (The head's byte limit already bounds what the list could hold.)
            self._refusal = (431, f"more than {self.limits.max_headers} request headers")
            raise _Refused
        refuser = self.refuser
        # Asked only while requests are being refused: nothing for the hot path to pay.
        if (
            refuser is not None
            and refuser.refusing()
            and self.url.endswith(b"/infer")
            and self._shed(refuser)
        ):
            return
        super().on_headers_complete()
        cycle = self.cycle
        if type(cycle) is RequestResponseCycle:
            cycle.__class__ = _OneWriteCycle
            scope: Any = cycle.scope  # (uvicorn's type allows no callables among extensions)
            scope["extensions"] = {RESPOND: _Respond(cast(_OneWriteCycle, cycle))}
        # Until its body is whole a request would close its connection after answering;
        # on_message_complete gives the keep-alive back.
        self._keep_alive = cycle.keep_alive and not self.drain.draining
        cycle.keep_alive = False

    def on_body(self, body: bytes) -> None:
        if not self._discarding:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._completed += 1
        if self._discarding:
            self._discarding = False
            self._in_head = True
            self._head_bytes = 0
            if not self.transport.is_closing():
                self._went_idle()
            return
        super().on_message_complete()
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.keep_alive = self._keep_alive
        self._in_head = True
        self._head_bytes = 0

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        context = contextvars.Context() if self.config.reset_contextvars else None
        task = self.loop.create_task(cycle.run_asgi(app), context=context)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)
        self._task = task

    # -- keep-alive ----------------------------------------------------------------

    def on_response_complete(self) -> None:
        # uvicorn's, but for the keep-alive timer (``_went_idle``).
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            self._idle_since = None
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._went_idle()

    def _unset_keepalive_if_required(self) -> None:
        # (uvicorn's cancels its timer: here the timer will find the connection busy.)
        self._idle_since = None

    def _went_idle(self) -> None:
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._keep_alive_due
            )

    def _keep_alive_due(self) -> None:
        """The keep-alive timer: close a connection idle for the whole timeout."""
        self.timeout_keep_alive_task = None
        since = self._idle_since
        if since is None or self.transport.is_closing():
            return  # a request is on: its response arms the timer again
        left = since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_due)
            return
        self.timeout_keep_alive_handler()

    # -- refusals ------------------------------------------------------------------

    def _shed(self, refuser: Refuser) -> bool:
        """Answer 503 from the head alone when the request's queue would refuse it."""
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.pipeline:
            return False  # an answer is under way on this connection: keep the order
        if self.parser.get_method() != b"POST":
            return False
        path = httptools.parse_url(self.url).path.decode("ascii", "replace")
        if "%" in path:
            path = urllib.parse.unquote(path)
        parsed = parse_infer_path(self.root_path + path)
        if parsed is None:
            return False
        error = refuser.refusal(parsed[0], parsed[1], Headers(raw=self.headers))
        if error is None:
            return False
        self._discarding = True
        close = self.drain.draining or not self.parser.should_keep_alive()
        body = encode_error(error.message)
        head = _head_start(error.status_code, self.server_state.default_headers)
        for key, text in error.headers().items():
            head += [key.lower().encode("latin-1"), b": ", text.encode("latin-1"), b"\r\n"]
        head += [b"x-request-id: ", request_id_of(self.headers), b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n" if close else b"\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        self.server_state.total_requests += 1
        if close:
            self.transport.close()
        return True

    def send_400_response(self, msg: str) -> None:
        status, message = self._refusal or (400, "invalid HTTP request")
        self._refuse(status, message)

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a V2 error body and close, outside any request cycle."""
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                self.transport.close()
                return
            # The handler may still be waiting for the body: it sees a disconnect.
            cycle.disconnected = True
            cycle.message_event.set()
        body = encode_error(message)
        head = _head_start(status, self.server_state.default_headers)
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        self.transport.close()

    # -- timers --------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head:
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A response is under way; the next head may wait for it.
            self._arm_head_timer()
            return
        if self._head_bytes == 0:
            self.transport.close()  # a new connection that never sent a byte
            return
        limit = self.limits.header_timeout_s
        self._refuse(408, f"request head not received within {limit:g} s")

    def _body_timeout(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if (
            self.transport.is_closing()
            or cycle is None
            or not cycle.more_body
            or cycle.response_complete
        ):
            return
        idle = self.loop.time() - self._last_read
        limit = self.limits.body_timeout_s
        if self.flow.read_paused or idle < limit:
            # Paused by the server itself (the handler has not read yet), or data came.
            wait = limit if self.flow.read_paused else limit - idle
            self._body_timer = self.loop.call_later(wait, self._body_timeout)
            return
        self._refuse(408, f"request body not received: nothing came for {limit:g} s")


def guarded_protocol(
    limits: ConnectionLimits, drain: DrainState, refuser: Refuser | None = None
) -> type[GuardedHttpProtocol]:
    """A ``GuardedHttpProtocol`` class bound to its settings (uvicorn's ``http=``)."""
    return type(
        "GuardedHttpProtocol",
        (GuardedHttpProtocol,),
        {
            "limits": limits,
            "drain": drain,
            "refuser": refuser,
            "__module__": __name__,
        },
    )
