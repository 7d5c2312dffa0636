"""The gateway's HTTP server: uvicorn with guarded connections, and a drain on SIGTERM.

Connections are accepted by :class:`~serving.http.listener.Listener`, every one waiting
at each turn of the loop, rather than by uvloop's server, which takes one a turn.

SIGTERM starts a drain: readiness answers 503 at once while the listener keeps
accepting and serving for ``server.drain_s``, so that load balancers take the gateway
out of rotation first; then the listener closes, requests in flight get
``server.shutdown_grace_s`` to finish (past it they are cancelled), the models are
unloaded, and the process exits 0 (1 when requests had to be cancelled). SIGINT
(Ctrl+C) skips the drain. A second signal ends the drain, or the grace, at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from types import FrameType
from typing import Any, cast

import uvicorn

from serving.config import ServerConfig
from serving.http.connection import ConnectionLimits, Refuser, guarded_protocol
from serving.http.drain import DrainState
from serving.http.listener import Listener
from serving.http.stuck import StuckReport

__all__ = ["GatewayServer"]

log = logging.getLogger("fermion.gateway")

#: Unloading, leaving the fleet and stopping the backend take seconds (Ray's the most).
_STUCK_REPORT_S = 10.0


class GatewayServer(uvicorn.Server):
    """uvicorn's server over ``GuardedHttpProtocol``, draining on SIGTERM.

    ``refuser`` lets connections refuse overloaded inference requests from their head
    (the ``InferenceService``); ``announce`` is printed on stdout once listening.
    """

    def __init__(
        self,
        app: Any,
        server: ServerConfig,
        drain: DrainState,
        *,
        refuser: Refuser | None = None,
        announce: str | None = None,
    ) -> None:
        limits = ConnectionLimits(
            max_header_bytes=server.max_header_bytes,
            max_headers=server.max_headers,
            header_timeout_s=server.header_timeout_s,
            body_timeout_s=server.body_timeout_s,
        )
        config = uvicorn.Config(
            app,
            log_level=server.log_level,
            access_log=False,  # server.access_log writes Fermion's own JSON lines instead
            loop="uvloop",
            http=guarded_protocol(limits, drain, refuser),
            ws="none",
            backlog=server.backlog,
            # uvicorn annotates int; the value goes to loop.call_later, which takes a float.
            timeout_keep_alive=cast(int, server.keep_alive_timeout_s),
        )
        super().__init__(config)
        self.drain = drain
        self._drain_s = server.drain_s
        self._grace_s = server.shutdown_grace_s
        self._announce = announce
        self._drain_until: float | None = None
        self._drain_logged = True
        #: Requests cancelled because the grace period ended (or a second signal came).
        self.cancelled_requests = 0
        #: Past this, a shutdown still running logs every task's and thread's stack.
        self.stuck_report_s = _STUCK_REPORT_S
        self._listeners: list[Listener] = []

    @property
    def exit_code(self) -> int:
        """0 after a clean stop; 1 when requests in flight had to be cancelled."""
        return 1 if self.cancelled_requests else 0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets is None:  # uvicorn binds host:port itself
            await super().startup(sockets=None)
        else:
            # The lifespan, and no uvicorn server: a Listener accepts from each socket.
            await super().startup(sockets=[])
            config = self.config

            def create_protocol() -> asyncio.Protocol:
                return config.http_protocol_class(  # type: ignore[call-arg]
                    config=config, server_state=self.server_state, app_state=self.lifespan.state
                )

            for sock in sockets:
                listener = Listener(sock, create_protocol, backlog=config.backlog)
                listener.start()
                self._listeners.append(listener)
        if self.started and self._announce is not None:
            print(self._announce, flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in a signal handler: set flags only; the main loop acts on them.
        self.drain.begin()
        if self.should_exit or self._drain_until is not None:
            self.should_exit = self.force_exit = True  # a second signal: stop now
            return
        if sig == signal.SIGTERM and self._drain_s > 0 and self.started:
            self._drain_until = time.monotonic() + self._drain_s
            self._drain_logged = False
            return
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None:
            if not self._drain_logged:
                self._drain_logged = True
                log.info("draining: readiness is 503, the listener closes in %g s", self._drain_s)
            if time.monotonic() >= self._drain_until:
                self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log.info("shutting down: the listener closes, requests in flight finish")
        for listener in self._listeners:
            listener.close()
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        deadline = time.monotonic() + self._grace_s
        while self.server_state.tasks and not self.force_exit and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        tasks = [t for t in self.server_state.tasks if not t.done()]
        if tasks:
            self.cancelled_requests = len(tasks)
            log.error("cancelling %d request(s) still running after the grace period", len(tasks))
            for task in tasks:
                task.cancel(msg="shutdown grace period over")
            await asyncio.wait(tasks, timeout=1.0)
        for connection in list(self.server_state.connections):
            connection.shutdown()
        async with StuckReport("the shutdown (models, fleet, backend)", self.stuck_report_s):
            await self.lifespan.shutdown()
