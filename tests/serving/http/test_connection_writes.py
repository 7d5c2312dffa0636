"""GuardedHttpProtocol's writes: a response of known length leaves in one write.

The protocol runs on this test's loop against a transport that records what it is
given (no server: what is checked is the sequence of writes, which a socket hides).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
from uvicorn.server import ServerState

from bench._transport import MemoryTransport
from serving.http.connection import RESPOND, ConnectionLimits, guarded_protocol
from serving.http.drain import DrainState

App = Callable[[Any, Any, Any], Awaitable[None]]


def _connect(app: App, *, access_log: bool = False) -> tuple[Any, MemoryTransport]:
    """A new connection of the gateway's protocol to ``app``, and its transport.
    uvicorn's access log is off, as the gateway runs it."""
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=access_log)
    config.load()
    state = ServerState()
    state.default_headers = [(b"server", b"test")]  # as uvicorn's startup sets them
    protocol = guarded_protocol(ConnectionLimits(), DrainState())(
        config=config, server_state=state, app_state={}
    )
    transport = MemoryTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def _serve(
    app: App, request: bytes, *, settle: int = 20, access_log: bool = False
) -> MemoryTransport:
    """``request`` fed to a new connection, then the loop run a while; ``closed`` tells
    whether the protocol closed the connection itself."""
    protocol, transport = _connect(app, access_log=access_log)
    protocol.data_received(request)
    for _ in range(settle):
        await asyncio.sleep(0)
    closed = transport.closed
    protocol.connection_lost(None)
    transport.closed = closed
    return transport


def _post(body: bytes, *, method: bytes = b"POST", extra: bytes = b"") -> bytes:
    return (
        method
        + b" /v2/models/m/infer HTTP/1.1\r\nhost: t\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"\r\n"
        + body
    )


def _answer(body: bytes, *, chunks: int = 1, length: bool = True) -> App:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"application/json")]
        if length:
            headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        step = max(1, len(body) // chunks)
        parts = [body[i : i + step] for i in range(0, len(body), step)] or [b""]
        for i, part in enumerate(parts):
            more = i < len(parts) - 1
            await send({"type": "http.response.body", "body": part, "more_body": more})

    return app


async def test_a_response_of_known_length_is_one_write() -> None:
    transport = await _serve(_answer(b'{"ok":1}'), _post(b"{}"))
    assert len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 8" in head
    assert body == b'{"ok":1}'


async def test_a_body_in_parts_sends_its_head_with_the_first() -> None:
    transport = await _serve(_answer(b"abcdef", chunks=3), _post(b"{}"))
    assert len(transport.writes) == 3
    assert transport.writes[0].endswith(b"\r\n\r\nab")
    assert transport.writes[1:] == [b"cd", b"ef"]


async def test_a_stream_sends_its_head_before_its_body_is_ready() -> None:
    ready = asyncio.Event()
    heads: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        heads.append(len(transport_writes()))
        await ready.wait()
        await send({"type": "http.response.body", "body": b"late"})

    box: list[MemoryTransport] = []

    def transport_writes() -> list[bytes]:
        return box[0].writes

    protocol, transport = _connect(app)
    box.append(transport)
    protocol.data_received(_post(b"{}"))
    for _ in range(10):
        await asyncio.sleep(0)
    assert heads == [1]  # chunked: the head went out alone, at once
    assert b"transfer-encoding: chunked" in box[0].writes[0]
    ready.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert box[0].writes[1:] == [b"4\r\nlate\r\n0\r\n\r\n"]
    protocol.connection_lost(None)


async def test_expect_100_continue_is_written_before_the_response() -> None:
    transport = await _serve(_answer(b"{}"), _post(b"{}", extra=b"expect: 100-continue\r\n"))
    assert transport.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert len(transport.writes) == 2
    assert transport.writes[1].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[1].endswith(b"\r\n\r\n{}")


async def test_a_head_request_gets_its_head() -> None:
    transport = await _serve(_answer(b"12345"), _post(b"", method=b"HEAD"))
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"content-length: 5\r\n\r\n")


@pytest.mark.parametrize("fail", ["raise", "return"])
async def test_an_app_that_stops_after_its_head_sends_the_head_and_closes(fail: str) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        start = {"type": "http.response.start", "status": 200, "headers": []}
        start["headers"] = [(b"content-length", b"10")]
        await send(start)
        if fail == "raise":
            raise RuntimeError("broken after its head")

    transport = await _serve(app, _post(b"{}"))
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.closed


async def test_keep_alive_answers_one_write_each() -> None:
    transport = await _serve(_answer(b"[1]"), _post(b"{}") + _post(b"{}"), settle=40)
    assert len(transport.writes) == 2
    assert all(w.endswith(b"\r\n\r\n[1]") for w in transport.writes)
    assert not transport.closed


def _responder(body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> App:
    """An app that answers through the request's ``Responder``, not ``send``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        answer = (
            headers
            if headers is not None
            else [
                (b"Content-Type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
        )
        await scope["extensions"][RESPOND](200, answer, body)

    return app


async def test_the_responder_writes_the_whole_answer_once() -> None:
    transport = await _serve(_responder(b'{"ok":1}'), _post(b"{}"))
    assert len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"content-type: application/json" in lines  # names lowercased, as send does
    assert b"content-length: 8" in lines
    assert lines[1] == b"server: test"  # the server's default headers first
    assert b"connection: close" not in lines
    assert body == b'{"ok":1}'
    assert not transport.closed


async def test_the_responder_answers_pipelined_requests_in_order() -> None:
    transport = await _serve(_responder(b"[1]"), _post(b"{}") + _post(b"{}"), settle=40)
    assert len(transport.writes) == 2
    assert all(w.endswith(b"\r\n\r\n[1]") for w in transport.writes)
    assert not transport.closed


async def test_the_responder_closes_an_http_1_0_connection() -> None:
    request = _post(b"{}").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    transport = await _serve(_responder(b"{}"), request)
    assert len(transport.writes) == 1
    assert b"\r\nconnection: close\r\n" in transport.writes[0]
    assert transport.closed


async def test_the_responder_closes_when_the_answer_says_so() -> None:
    headers = [(b"content-length", b"2"), (b"connection", b"keep-alive, Close")]
    transport = await _serve(_responder(b"{}", headers), _post(b"{}") + _post(b"{}"))
    assert len(transport.writes) == 1  # the second request is never answered
    assert transport.writes[0].count(b"connection:") == 1
    assert transport.closed


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"3")],  # not the body's length
        [],  # no length at all
        [(b"content-length", b"2"), (b"x-id", b"a\x01b")],  # a control character
    ],
    ids=["wrong-length", "no-length", "control-character"],
)
async def test_a_bad_answer_to_the_responder_becomes_a_500(
    headers: list[tuple[bytes, bytes]],
) -> None:
    transport = await _serve(_responder(b"{}", headers), _post(b"{}"))
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 500 ")
    assert transport.writes[0].endswith(b"Internal Server Error")
    assert transport.closed


async def test_the_responder_writes_through_send_while_uvicorns_access_log_is_on() -> None:
    transport = await _serve(_responder(b"[2]"), _post(b"{}"), access_log=True)
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\n[2]")


async def test_the_responder_of_a_head_request_sends_no_body() -> None:
    transport = await _serve(_responder(b"12345"), _post(b"", method=b"HEAD"))
    assert len(transport.writes) == 1
    assert transport.writes[0].endswith(b"content-length: 5\r\n\r\n")


async def test_the_responder_writes_nothing_once_the_client_is_gone() -> None:
    answered: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await asyncio.sleep(0.01)  # the client leaves meanwhile
        await scope["extensions"][RESPOND](200, [(b"content-length", b"2")], b"{}")
        answered.append(True)

    protocol, transport = _connect(app)
    protocol.data_received(_post(b"{}"))
    await asyncio.sleep(0)
    protocol.connection_lost(None)
    await asyncio.sleep(0.05)
    assert answered == [True]
    assert transport.writes == []


@pytest.mark.parametrize("app", ["responder", "send"])
async def test_an_answered_request_leaves_nothing_for_the_garbage_collector(app: str) -> None:
    """Every request's objects (cycle, scope, headers) are freed as the answer goes out:
    a reference loop among them would leave them to the collector, whose full passes
    over a heap of many requests' objects stall the loop for milliseconds."""
    answer = _responder(b"{}") if app == "responder" else _answer(b"{}")
    request = _post(b"{}")
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            await _serve(answer, request + request, settle=40)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, RequestResponseCycle)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
