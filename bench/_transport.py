"""An in-memory asyncio transport, to drive the gateway's connection protocol without a
socket (``gateway_overhead --http``; the tests use it too)."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["MemoryTransport"]


class MemoryTransport(asyncio.Transport):
    """Keeps every write (``writes``, and ``answers`` to await them); closing is
    recorded, nothing is sent anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self.answers.put_nowait(self.writes[-1])

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
