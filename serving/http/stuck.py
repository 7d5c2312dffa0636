"""A report of where a stop is stuck: every task's and every thread's stack, once.

The gateway's shutdown (models unloaded, the fleet left, the backend stopped) should
take seconds. When it does not, whoever stops the process (the supervisor of
``--workers``, Kubernetes) kills it in the end, and nothing tells what it waited for.
``StuckReport`` is armed when that part begins and disarmed when it ends; past its
delay it logs, once, the stack of every asyncio task still pending and of every thread.
It only reports: the stop goes on, and the process's exit code is unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import traceback
from types import FrameType
from typing import Any

__all__ = ["StuckReport"]

log = logging.getLogger("fermion.gateway")

#: Frames shown per task or thread.
_DEPTH = 16


class StuckReport:
    """Log where ``what`` waits when it takes more than ``after_s`` (armed as a context)."""

    def __init__(self, what: str, after_s: float) -> None:
        self.what = what
        self.after_s = after_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        #: The report's text once it was logged (None before, or when it never fired).
        self.report: str | None = None

    async def __aenter__(self) -> StuckReport:
        self._loop = asyncio.get_running_loop()
        # A thread, not the loop's own timer: a stop that blocks the loop is reported too.
        self._timer = threading.Timer(self.after_s, self._fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _fire(self) -> None:
        threads = _thread_stacks()
        loop = self._loop
        if loop is None or loop.is_closed():
            self._log(threads, "")
            return
        # Task stacks are read on the loop's thread; a loop that does not run them within
        # a second is blocked, and the thread stacks say where.
        done = threading.Event()

        def on_loop() -> None:
            self._log(threads, _task_stacks(loop))
            done.set()

        try:
            loop.call_soon_threadsafe(on_loop)
        except RuntimeError:  # the loop closed meanwhile
            self._log(threads, "")
            return
        if not done.wait(1.0):
            self._log(threads, "(the event loop is blocked: see the main thread's stack)\n")

    def _log(self, threads: str, tasks: str) -> None:
        with self._lock:
            if self.report is not None:
                return
            self.report = f"asyncio tasks still pending:\n{tasks}threads:\n{threads}"
        log.warning("%s still running after %g s; %s", self.what, self.after_s, self.report)


def _task_stacks(loop: asyncio.AbstractEventLoop) -> str:
    out = []
    for task in asyncio.all_tasks(loop):
        if task is asyncio.current_task(loop):
            continue
        # The chain of awaits from the task's coroutine down (Task.get_stack shows its top
        # frame only, which for a lifespan is uvicorn's `await app(...)`).
        frames: list[tuple[FrameType, int]] = []
        awaited: Any = task.get_coro()
        while awaited is not None and len(frames) < _DEPTH:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                frames.append((frame, frame.f_lineno))
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        stack = "".join(traceback.StackSummary.extract(frames).format())
        out.append(f"task {task.get_name()}:\n{stack}")
    return "".join(out)


def _thread_stacks() -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue  # this timer's own thread
        stack = "".join(traceback.format_stack(frame, limit=_DEPTH))
        out.append(f"thread {names.get(ident, ident)}:\n{stack}")
    return "".join(out)
