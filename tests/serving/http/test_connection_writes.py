"""GuardedHttpProtocol's writes: a response of known length leaves in one write.

The protocol runs on this test's loop against a transport that records what it is
given (no server: what is checked is the sequence of writes, which a socket hides).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from serving.http.connection import ConnectionLimits, guarded_protocol
from serving.http.drain import DrainState

App = Callable[[Any, Any, Any], Awaitable[None]]


class _RecordingTransport(asyncio.Transport):
    """Keeps every write; closing is recorded, nothing is sent anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _serve(app: App, request: bytes, *, settle: int = 20) -> _RecordingTransport:
    """``request`` fed to a new connection, then the loop run a while; ``closed`` tells
    whether the protocol closed the connection itself."""
    config = uvicorn.Config(app, lifespan="off", log_level="warning")
    config.load()
    protocol = guarded_protocol(ConnectionLimits(), DrainState())(
        config=config, server_state=ServerState(), app_state={}
    )
    transport = _RecordingTransport()
    protocol.connection_made(transport)
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

    box: list[_RecordingTransport] = []

    def transport_writes() -> list[bytes]:
        return box[0].writes

    config = uvicorn.Config(app, lifespan="off", log_level="warning")
    config.load()
    protocol = guarded_protocol(ConnectionLimits(), DrainState())(
        config=config, server_state=ServerState(), app_state={}
    )
    box.append(_RecordingTransport())
    protocol.connection_made(box[0])
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
