"""Waiting in a test for what another task or thread does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["until"]


async def until(check: Callable[[], bool], what: str) -> None:
    """Return once ``check()`` holds, polling every 5 ms, 2,000 times at most (10 s on
    an idle host); then fail with ``what``."""
    for _ in range(2000):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")
