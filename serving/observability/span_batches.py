"""Finished spans in batches to an exporter on one thread, with a bounded queue whose
drops are counted (``fermion_trace_spans_dropped_total``), never blocking the caller.

``BatchingSpanProcessor`` is the queue: the event loop's thread only appends a span
(``on_end``); ``batch`` of them, or what has waited ``delay_s``, become a frame for
the writer thread. At most ``max_frames`` frames wait; past them a frame is dropped
and its spans counted in ``dropped``, as are the spans of a frame the sink could not
send. A line in the log says so at most once a minute, with the count since the last
line: a collector that stops answering on a busy gateway loses thousands of spans a
second, and a line for each would flood the log and cost the loop more than the span.

Two sinks: ``ThreadSpanProcessor`` hands each frame to an exporter on the writer
thread (the default; in place of the SDK's ``BatchSpanProcessor``, which counts no
drop and builds a log record for each span it drops); ``ProcessSpanProcessor``
(``export_process``) writes it to a child process that exports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import Span

__all__ = ["LOG_EVERY_S", "BatchingSpanProcessor", "ThreadSpanProcessor", "frames_for"]

log = logging.getLogger("fermion.tracing")

#: Lines about dropped spans: at most one this often.
LOG_EVERY_S: Final = 60.0


def frames_for(queue_size: int, batch: int) -> int:
    """Frames of ``batch`` spans that hold ``queue_size`` spans (``OTEL_BSP_MAX_QUEUE_SIZE``)."""
    return max(1, queue_size // max(1, batch))


class BatchingSpanProcessor(SpanProcessor):
    """Sends finished, sampled spans to ``_send``, ``batch`` at a time, and what has
    waited ``delay_s`` whatever its number, from one thread (named ``thread``).

    A subclass sets up its sink, then calls ``_start_writer``; it defines ``_item``
    (what is kept of a span), ``_send`` (which calls ``_lost`` for what it could not
    send) and ``_close`` (after the last frame, within a deadline).
    """

    def __init__(self, *, batch: int, delay_s: float, max_frames: int, thread: str) -> None:
        self._batch = max(1, batch)
        self._delay_s = delay_s
        self._max_frames = max(1, max_frames)
        self._cond = threading.Condition()
        self._items: list[Any] = []
        self._frames: deque[list[Any]] = deque()
        self._writing = False
        self._closing = False
        #: Sampled spans not exported: their frame was dropped, or the sink failed them.
        self.dropped = 0
        self._logged = 0
        self._next_log = 0.0
        self._writer = threading.Thread(target=self._write_frames, name=thread, daemon=True)

    def _start_writer(self) -> None:
        self._writer.start()

    # -- a subclass's part

    def _item(self, span: ReadableSpan) -> Any:
        """What is kept of a finished span until its frame is sent."""
        return span

    def _send(self, items: list[Any]) -> None:  # pragma: no cover - every subclass has one
        raise NotImplementedError

    def _close(self, deadline: float) -> None:
        """Stop the sink, by ``deadline`` (``time.monotonic``), after the last frame."""

    # -- the queue

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        item = self._item(span)
        with self._cond:
            if self._closing:
                lost = 1
            else:
                self._items.append(item)
                lost = self._seal() if len(self._items) >= self._batch else 0
        if lost:
            self._lost(lost, "tracing was shut down" if self._closing else self._full())

    def _full(self) -> str:
        return f"{self._max_frames} batches were already waiting for the exporter"

    def _seal(self) -> int:
        """Move the items into a frame for the writer (held: ``_cond``); the number of
        spans dropped for want of room."""
        items, self._items = self._items, []
        if not items:
            return 0
        if len(self._frames) >= self._max_frames:
            return len(items)
        self._frames.append(items)
        self._cond.notify()
        return 0

    def _write_frames(self) -> None:
        while True:
            with self._cond:
                lost = 0
                if not self._frames and not self._closing:
                    self._cond.wait(self._delay_s)
                if not self._frames:
                    lost = self._seal()  # what waited a whole delay, or the last of it
                frame = self._frames.popleft() if self._frames else None
                self._writing = frame is not None
                done = frame is None and self._closing
            if lost:
                self._lost(lost, self._full())
            if done:
                return
            if frame is None:
                continue
            try:
                self._send(frame)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    def _lost(self, spans: int, why: str) -> None:
        """Count ``spans`` not exported; say so in the log at most once a minute."""
        with self._cond:
            self.dropped += spans
            now = time.monotonic()
            if now < self._next_log:
                return
            self._next_log = now + LOG_EVERY_S
            count, self._logged = self.dropped - self._logged, self.dropped
        log.warning(
            "tracing: %d span(s) not exported since the last such line: %s "
            "(fermion_trace_spans_dropped_total counts them all)",
            count,
            why,
        )

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Send every finished span (wait for the sink to take it) within the timeout."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._cond:
            lost = self._seal()
            self._cond.notify_all()
            while self._frames or self._writing:
                left = deadline - time.monotonic()
                if left <= 0 or not self._writer.is_alive():
                    break
                self._cond.wait(left)
            flushed = not (self._frames or self._writing)
        if lost:
            self._lost(lost, self._full())
        return flushed and not lost

    def shutdown(self, timeout_millis: int = 10_000) -> None:
        """Send what is left, then stop the sink, all within ``timeout_millis``."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._cond:
            if self._closing:
                return
            self._closing = True
            lost = self._seal()
            self._cond.notify_all()
        if lost:
            self._lost(lost, self._full())
        if self._writer.is_alive():
            self._writer.join(max(deadline - time.monotonic(), 0.0))
        self._close(deadline)


class ThreadSpanProcessor(BatchingSpanProcessor):
    """Exports each frame with ``exporter`` on the writer thread: an export that
    failed (its retries spent, or refused) counts its spans as dropped."""

    def __init__(
        self, exporter: SpanExporter, *, batch: int, delay_s: float, max_frames: int
    ) -> None:
        super().__init__(
            batch=batch, delay_s=delay_s, max_frames=max_frames, thread="fermion-trace-export"
        )
        self._exporter = exporter
        self._start_writer()

    def _send(self, items: Sequence[ReadableSpan]) -> None:
        try:
            result = self._exporter.export(items)
        except Exception as e:  # an exporter's bug must not end the writer
            self._lost(len(items), f"the exporter failed: {e!r}")
            return
        if result is not SpanExportResult.SUCCESS:
            # (The exporter has logged why: the status, or the error of its last try.)
            self._lost(len(items), "the collector did not take them")

    def _close(self, deadline: float) -> None:
        # (An export still running past the deadline is left to its own timeout.)
        self._exporter.shutdown()
