"""The gateway's listening socket, accepted from in bursts.

libuv (under uvloop) accepts one connection each time the event loop polls. A gateway
busy with requests polls every few milliseconds, so when many clients connect at once
(a load test starting, a client fleet reconnecting after a deploy, a load balancer
opening its pool) the last of them waited one loop turn per connection ahead of it:
measured with ``perf`` on ``bench.tail_bench``'s c=64 cells, the 64 connections of a
run were accepted over 100-190 ms, one per turn, and their first requests made every
cell's maximum latency. A :class:`Listener` accepts every connection waiting (up to
the backlog) each time the socket is readable, and hands each to the loop as an
accepted socket: the transport, its protocol and TCP_NODELAY are the loop's own.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

__all__ = ["Listener"]

log = logging.getLogger("fermion.gateway")

#: After running out of file descriptors, how long the listener rests before it tries
#: again (the connections wait in the kernel's queue meanwhile).
_RETRY_AFTER_S = 0.5
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Listener:
    """Accepts from ``sock`` on the running loop, up to ``backlog`` connections a turn.

    Stands where uvicorn keeps an ``asyncio.Server``: ``close`` stops accepting (the
    socket stays open; its owner closes it) and ``wait_closed`` returns at once.
    """

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        backlog: int,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._factory = protocol_factory
        self._backlog = backlog
        self._serving = False
        self._retry: asyncio.TimerHandle | None = None
        #: Connections accepted and not yet handed to the loop.
        self._handing: set[asyncio.Task[object]] = set()
        sock.setblocking(False)
        sock.listen(backlog)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,)

    def start(self) -> None:
        """Accept from now on."""
        if not self._serving:
            self._serving = True
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        """Accept no more connections."""
        if self._serving:
            self._serving = False
            self._loop.remove_reader(self._sock.fileno())
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    async def wait_closed(self) -> None:
        """Nothing to wait for: connections belong to the server, not the listener."""

    def _accept(self) -> None:
        for _ in range(self._backlog):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left
            except ConnectionAbortedError:
                continue  # the client gave up while it waited
            except OSError as e:
                if e.errno not in _OUT_OF_FDS:
                    raise
                log.warning(
                    "cannot accept connections (%s): trying again in %g s",
                    e.strerror,
                    _RETRY_AFTER_S,
                )
                self.close()
                self._retry = self._loop.call_later(_RETRY_AFTER_S, self.start)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._hand_over(conn))
            self._handing.add(task)
            task.add_done_callback(self._handing.discard)

    async def _hand_over(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError as e:  # the client left before its transport was made
            log.debug("an accepted connection closed before it was served: %s", e)
            conn.close()
