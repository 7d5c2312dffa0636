"""An ASGI app served by a real uvicorn server on a loopback port, in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from starlette.types import ASGIApp

__all__ = ["LoopbackServer", "serve_on_loopback"]


class LoopbackServer:
    """A running uvicorn server: its base URL, and a way to stop it early."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], url: str) -> None:
        self._server = server
        self._task = task
        self.url = url

    async def stop(self) -> None:
        """Stop listening and close every connection (the app's lifespan ends)."""
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def serve_on_loopback(
    app: ASGIApp, *, timeout_s: float = 60.0
) -> AsyncIterator[LoopbackServer]:
    """Serve ``app`` on 127.0.0.1, a port the OS picks; yields once it listens."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    async with asyncio.timeout(timeout_s):
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it listened")
            await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    running = LoopbackServer(server, task, f"http://127.0.0.1:{port}")
    try:
        yield running
    finally:
        await running.stop()
