"""GuardedHttpProtocol's keep-alive: an idle connection closes after the timeout, a busy
one never, and a timer is armed per idle stretch rather than per request.

The protocol runs on this test's loop over an in-memory transport.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from bench._transport import MemoryTransport
from serving.http.connection import ConnectionLimits, GuardedHttpProtocol, guarded_protocol
from serving.http.drain import DrainState

_REQUEST = b"POST /v2/models/m/infer HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}"


async def _app(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


def _connect(timeout_s: float) -> tuple[GuardedHttpProtocol, MemoryTransport]:
    config = uvicorn.Config(
        _app,
        lifespan="off",
        log_level="warning",
        timeout_keep_alive=timeout_s,  # type: ignore[arg-type]
    )
    config.load()
    state = ServerState()
    state.default_headers = []
    protocol = guarded_protocol(ConnectionLimits(), DrainState())(
        config=config, server_state=state, app_state={}
    )
    transport = MemoryTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def _ask(protocol: GuardedHttpProtocol, transport: MemoryTransport) -> None:
    protocol.data_received(_REQUEST)
    answer = await asyncio.wait_for(transport.answers.get(), 1.0)
    assert answer.startswith(b"HTTP/1.1 200 ")
    for _ in range(5):  # the response's completion runs after its write
        await asyncio.sleep(0)


async def test_an_idle_connection_closes_after_the_timeout() -> None:
    protocol, transport = _connect(0.1)
    await _ask(protocol, transport)
    started = asyncio.get_running_loop().time()
    await asyncio.sleep(0.05)
    assert not transport.closed
    while not transport.closed:
        await asyncio.sleep(0.01)
        assert asyncio.get_running_loop().time() - started < 1.0
    # (``started`` is a few loop turns after the answer the timeout counts from.)
    assert asyncio.get_running_loop().time() - started >= 0.1 - 0.01
    protocol.connection_lost(None)


async def test_a_connection_asked_more_often_than_the_timeout_stays_open() -> None:
    protocol, transport = _connect(0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < 0.35:  # several timeouts long, never idle for one
        await _ask(protocol, transport)
        assert not transport.closed
        await asyncio.sleep(0.03)
    idle = loop.time()
    while not transport.closed:
        await asyncio.sleep(0.01)
    assert loop.time() - idle >= 0.1 - 0.03  # a timeout from its last answer, not its first
    protocol.connection_lost(None)


async def test_a_request_under_way_when_the_timer_fires_is_not_cut_off() -> None:
    protocol, transport = _connect(0.05)
    await _ask(protocol, transport)
    protocol.data_received(_REQUEST[:20])  # a request begins, its head still coming
    await asyncio.sleep(0.12)
    assert not transport.closed
    protocol.data_received(_REQUEST[20:])
    answer = await asyncio.wait_for(transport.answers.get(), 1.0)
    assert answer.startswith(b"HTTP/1.1 200 ")
    protocol.connection_lost(None)


async def test_one_timer_per_idle_stretch_not_per_request(monkeypatch: Any) -> None:
    protocol, transport = _connect(5.0)
    loop = asyncio.get_running_loop()
    armed: list[Any] = []
    call_later = loop.call_later

    def counting(delay: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__self__", None) is protocol:  # (not wait_for's own)
            armed.append(callback)
        return call_later(delay, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_later", counting)
    for _ in range(20):
        await _ask(protocol, transport)
    assert len(armed) == 1
    protocol.connection_lost(None)
    assert protocol.timeout_keep_alive_task is None  # cancelled with the connection
