"""Peers of Fermion's replica channel that a real replica cannot be made to be on cue."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from serving.inference.backends.channel import encode


@contextmanager
def replica_dying_mid_batch() -> Iterator[str]:
    """The address of a listener that answers one connection's hello, reads its first
    batch, then closes without answering: a replica killed while computing."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for answer in (True, False):  # the hello is answered, the batch is not
                (n,) = struct.unpack("<Q", conn.recv(8, socket.MSG_WAITALL))
                conn.recv(n, socket.MSG_WAITALL)
                if answer:
                    conn.sendall(b"".join(bytes(p) for p in encode({}, ok=True)))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        thread.join(5)
        listener.close()
