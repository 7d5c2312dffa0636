"""The gateway's listener: new connections are taken whole when the loop gets to them.

The gateway runs on uvloop, and so does this module's server (the behaviour under test
is the event loop's). libuv accepts one connection each time the loop polls; a gateway
busy with requests polls every few milliseconds, so a burst of new connections (a load
test starting, a client fleet reconnecting after a deploy) used to wait one loop turn
per connection ahead of it: the 64th connection of a wrk run waited 100-200 ms for its
accept on a saturated gateway (`perf` trace of `bench.tail_bench`'s c=64 cells).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from serving.config import ServerConfig
from serving.http.drain import DrainState
from serving.http.server import GatewayServer

Scenario = Callable[[GatewayServer, socket.socket], Awaitable[None]]


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    body = b"ok"
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": body})


def _run(scenario: Scenario, **server: Any) -> None:
    async def main() -> None:
        gateway = GatewayServer(_app, ServerConfig.model_validate(server), DrainState())
        sock = socket.create_server(("127.0.0.1", 0), backlog=server.get("backlog", 4096))
        with sock:
            serving = asyncio.create_task(gateway.serve(sockets=[sock]))
            while not gateway.started:
                await asyncio.sleep(0.01)
            try:
                await scenario(gateway, sock)
            finally:
                gateway.should_exit = True
                await serving

    uvloop.run(main())


def _connect_while_the_loop_is_busy(sock: socket.socket, n: int) -> list[socket.socket]:
    """``n`` clients connected (the kernel completes their handshakes) while the loop
    runs this, so that none is accepted yet."""
    return [socket.create_connection(sock.getsockname()) for _ in range(n)]


def test_a_burst_of_connections_is_accepted_in_one_loop_turn() -> None:
    async def scenario(gateway: GatewayServer, sock: socket.socket) -> None:
        clients = _connect_while_the_loop_is_busy(sock, 40)
        try:
            for _ in range(6):  # six turns of the loop: accept, transports, connection_made
                await asyncio.sleep(0)
            assert len(gateway.server_state.connections) == 40
        finally:
            for c in clients:
                c.close()

    _run(scenario)


def test_every_connection_of_a_burst_is_answered_and_the_listener_keeps_accepting() -> None:
    async def scenario(gateway: GatewayServer, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()

        async def ask(client: socket.socket) -> bytes:
            client.setblocking(False)
            await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"ok"):
                chunk = await loop.sock_recv(client, 4096)
                assert chunk, "the connection closed before its answer"
                answer += chunk
            return answer

        for burst in (30, 5):
            clients = _connect_while_the_loop_is_busy(sock, burst)
            answers = await asyncio.gather(*(ask(c) for c in clients))
            assert all(a.startswith(b"HTTP/1.1 200 OK") for a in answers)
            for c in clients:
                c.close()

    _run(scenario)


def test_past_the_backlog_clients_wait_in_the_kernel_and_are_all_answered() -> None:
    # More connections than the backlog at once: the kernel holds the rest (their SYNs
    # are retried), and each is accepted and answered in the end.
    async def scenario(gateway: GatewayServer, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()

        async def ask() -> bytes:
            reader, writer = await asyncio.open_connection(*sock.getsockname())
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            answer = await reader.read()
            writer.close()
            return answer

        answers = await asyncio.wait_for(asyncio.gather(*(ask() for _ in range(48))), 30)
        assert all(a.startswith(b"HTTP/1.1 200 OK") for a in answers)
        assert loop.is_running()

    _run(scenario, backlog=16)
