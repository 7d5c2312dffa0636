"""Finished spans in batches to an exporter on one thread, with a bounded queue whose
drops are counted (``fermion_trace_spans_dropped_total``), never blocking the caller.

``BatchingSpanProcessor`` is the queue: the event loop's thread only appends a span
(``on_end``, no lock taken); the writer thread sends ``batch`` of them at a time, and
what has waited ``delay_s``. At most ``max_queue`` spans wait; past them a span is
dropped and counted in ``dropped``, as are the spans of a batch the sink could not
send. A line in the log says so at most once a minute, with the count since the last
line: a collector that stops answering on a busy gateway loses thousands of spans a
second, and a line for each would flood the log and cost the loop more than the span.

Two sinks: ``ThreadSpanProcessor`` hands each batch to an exporter on the writer
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

__all__ = ["LOG_EVERY_S", "BatchingSpanProcessor", "ThreadSpanProcessor"]

log = logging.getLogger("fermion.tracing")

#: Lines about dropped spans: at most one this often.
LOG_EVERY_S: Final = 60.0


class BatchingSpanProcessor(SpanProcessor):
    """Sends finished, sampled spans to ``_send``, ``batch`` at a time, and what has
    waited ``delay_s`` whatever its number, from one thread (named ``thread``); at most
    ``max_queue`` spans wait.

    Queuing a span takes no lock (the loop's thread must never wait for the writer,
    which may have lost the GIL while holding one): it is appended to a deque, and the
    writer woken when a batch is there, as the SDK's processor does. Only a span
    dropped takes ``_counting``, held only to count and read the clock. A subclass
    sets up its sink, then calls ``_start_writer``; it defines ``_item`` (what is kept
    of a span), ``_send`` (which calls ``_lost`` for what it could not send) and
    ``_close`` (after the last batch, within a deadline).
    """

    def __init__(self, *, batch: int, delay_s: float, max_queue: int, thread: str) -> None:
        self._max_queue = max(1, max_queue)
        # (A batch bigger than the queue would never fill: the SDK refuses one.)
        self._batch = min(max(1, batch), self._max_queue)
        self._delay_s = delay_s
        self._queue: deque[Any] = deque()
        self._wake = threading.Event()
        #: Flushes asked and not yet done (``force_flush`` waits on ``_cond``).
        self._cond = threading.Condition(threading.Lock())
        self._flushes = 0
        self._closing = False
        self._counting = threading.Lock()
        #: Sampled spans not exported: no room in the queue, or the sink failed them.
        self.dropped = 0
        self._logged = 0
        self._next_log = 0.0
        self._writer = threading.Thread(target=self._write_batches, name=thread, daemon=True)

    def _start_writer(self) -> None:
        self._writer.start()

    # -- a subclass's part

    def _item(self, span: ReadableSpan) -> Any:
        """What is kept of a finished span until its batch is sent."""
        return span

    def _send(self, items: list[Any]) -> None:  # pragma: no cover - every subclass has one
        raise NotImplementedError

    def _close(self, deadline: float) -> None:
        """Stop the sink, by ``deadline`` (``time.monotonic``), after the last batch."""

    # -- the queue

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        if self._closing:  # (a request still ending while the gateway stops: no line)
            with self._counting:
                self.dropped += 1
            return
        queue = self._queue
        if len(queue) >= self._max_queue:
            self._lost(1, self._full())
            return
        queue.append(self._item(span))
        if len(queue) >= self._batch and not self._wake.is_set():
            self._wake.set()

    def _full(self) -> str:
        return f"{self._max_queue} spans were already waiting for the exporter"

    def _write_batches(self) -> None:
        queue = self._queue
        while True:
            woken = self._wake.wait(self._delay_s)
            self._wake.clear()
            closing = self._closing
            flushes = self._flushes
            # Every full batch; then what is left, when it waited a whole delay, or for
            # a flush or the shutdown.
            everything = closing or flushes or not woken
            while len(queue) >= self._batch or (everything and queue):
                batch = [queue.popleft() for _ in range(min(self._batch, len(queue)))]
                try:
                    self._send(batch)
                except Exception as e:  # a sink's bug must not end the writer
                    self._lost(len(batch), f"the exporter failed: {e!r}")
            with self._cond:
                self._flushes -= flushes
                self._cond.notify_all()
            if closing:
                return

    def _lost(self, spans: int, why: str) -> None:
        """Count ``spans`` not exported; say so in the log at most once a minute."""
        with self._counting:
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
        """Send every span finished so far (wait for the sink to take it), within the
        timeout; False when it did not, or the processor is shut down."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._cond:
            self._flushes += 1
            self._wake.set()
            while self._flushes:
                left = deadline - time.monotonic()
                if left <= 0 or not self._writer.is_alive():
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def shutdown(self, timeout_millis: int = 10_000) -> None:
        """Send what is left, then stop the sink, all within ``timeout_millis``."""
        deadline = time.monotonic() + timeout_millis / 1000
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._writer.is_alive():
            self._writer.join(max(deadline - time.monotonic(), 0.0))
        self._close(deadline)


class ThreadSpanProcessor(BatchingSpanProcessor):
    """Exports each batch with ``exporter`` on the writer thread: an export that
    failed (its retries spent, or refused) counts its spans as dropped."""

    def __init__(
        self, exporter: SpanExporter, *, batch: int, delay_s: float, max_queue: int
    ) -> None:
        super().__init__(
            batch=batch, delay_s=delay_s, max_queue=max_queue, thread="fermion-trace-export"
        )
        self._exporter = exporter
        self._start_writer()

    def _send(self, items: Sequence[ReadableSpan]) -> None:
        if self._exporter.export(items) is not SpanExportResult.SUCCESS:
            # (The exporter has logged why: the status, or the error of its last try.)
            self._lost(len(items), "the collector did not take them")

    def _close(self, deadline: float) -> None:
        # (An export still running past the deadline is left to its own timeout.)
        self._exporter.shutdown()
