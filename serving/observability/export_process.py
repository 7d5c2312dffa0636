"""OTLP export from a child process, off the gateway's GIL (``tracing.export_process``).

In the gateway's process the exporter's thread encodes and posts every batch holding
the GIL that the event loop needs: about 15 µs a span, 77 µs for a sampled request's
five spans, which at c=1 arrives in bursts of about a millisecond every 64 spans
(README, Tail latency, sixteenth round). Here the gateway keeps only a span's fields,
as a tuple of plain values (``span_record``); a writer thread ``marshal``s 64 of them
at a time into a pipe, and a child process (``python -m
serving.observability.export_process``) rebuilds the SDK's ``ReadableSpan`` from them
(``readable_span``) and hands them to the same exporter the gateway would have used:
``otlp_wire``'s encoding, the SDK's client, its retries and backoff.

Nothing here blocks the event loop. A full pipe (a collector that stopped answering,
a child still starting) holds frames in a bounded queue; past it a frame is dropped
and its spans counted (``dropped``). A child that died is started again, at most once
a second. ``shutdown`` writes what is left, closes the pipe (the child exports what it
has, then exits) and waits for the child at most the time it is given, then stops it.
A child whose gateway is gone exits within a second, whatever it still holds.

Every span of a process shares its resource: the child builds it as the gateway did,
from the service name and the same environment (``OTEL_RESOURCE_ATTRIBUTES``), and the
records carry no resource.
"""

from __future__ import annotations

import contextlib
import json
import logging
import marshal
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from serving.observability.otlp_export import otlp_exporter
from serving.observability.span_batches import BatchingSpanProcessor

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

__all__ = ["ProcessSpanProcessor", "readable_span", "span_record"]

log = logging.getLogger("fermion.tracing")

#: A frame: its length (4 bytes, little-endian), then a ``marshal``led list of records.
_LENGTH: Final = struct.Struct("<I")
#: The pipe's buffer asked for (Linux's F_SETPIPE_SZ; the default is 64 KiB).
_PIPE_BYTES: Final = 1 << 20
_F_SETPIPE_SZ: Final = 1031
#: The environment variable that carries the child's settings (JSON).
_SETTINGS: Final = "FERMION_TRACE_EXPORT"
#: The child's niceness, above the gateway's: on a host with few cores, its posts wait
#: for the event loop and the inference threads, not the other way round.
_NICE: Final = 10
#: A child that died is started again at most this often.
_RESTART_S: Final = 1.0

#: The record's fields, in order (``span_record``).
Record = tuple[Any, ...]


def _context(context: SpanContext) -> tuple[Any, ...]:
    return (
        context.trace_id,
        context.span_id,
        context.is_remote,
        int(context.trace_flags),
        tuple(context.trace_state.items()),
    )


def _span_context(fields: Sequence[Any]) -> SpanContext:
    trace_id, span_id, remote, flags, state = fields
    return SpanContext(trace_id, span_id, remote, TraceFlags(flags), TraceState(list(state)))


def span_record(span: ReadableSpan) -> Record:
    """``span``'s fields as plain values (ints, strs, tuples, dicts) that ``marshal``
    writes, everything an OTLP exporter reads but the resource."""
    context = span.get_span_context()
    assert context is not None
    parent = span.parent
    status = span.status
    scope = span.instrumentation_scope
    return (
        span.name,
        _context(context),
        None if parent is None else _context(parent),
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes or {}),
        span.dropped_attributes,
        [
            (event.name, event.timestamp, dict(event.attributes or {}), event.dropped_attributes)
            for event in span.events
        ],
        span.dropped_events,
        [
            (_context(link.context), dict(link.attributes or {}), link.dropped_attributes)
            for link in span.links
        ],
        span.dropped_links,
        (status.status_code.value, status.description),
        None if scope is None else (scope.name, scope.version, scope.schema_url),
    )


def readable_span(record: Record, resource: Resource) -> ReadableSpan:
    """The ``ReadableSpan`` that ``span_record`` took ``record`` from, with ``resource``."""
    from opentelemetry.attributes import BoundedAttributes

    (
        name,
        context,
        parent,
        kind,
        start,
        end,
        attributes,
        dropped_attributes,
        events,
        dropped_events,
        links,
        dropped_links,
        (code, description),
        scope,
    ) = record

    def bounded(values: Mapping[str, Any], dropped: int) -> Mapping[str, Any]:
        if not dropped:
            return values
        kept = BoundedAttributes(None, values, immutable=False)
        kept.dropped = dropped
        return kept

    def counted(items: list[Any], dropped: int) -> Sequence[Any]:
        if not dropped:
            return tuple(items)
        kept = BoundedList.from_seq(None, items)
        kept.dropped = dropped
        return kept

    return ReadableSpan(
        name=name,
        context=_span_context(context),
        parent=None if parent is None else _span_context(parent),
        resource=resource,
        attributes=bounded(attributes, dropped_attributes),
        events=counted(
            [Event(n, bounded(a, d), timestamp=t) for n, t, a, d in events], dropped_events
        ),
        links=counted([Link(_span_context(c), bounded(a, d)) for c, a, d in links], dropped_links),
        kind=SpanKind(kind),
        status=Status(StatusCode(code), description),
        start_time=start,
        end_time=end,
        instrumentation_scope=None if scope is None else InstrumentationScope(*scope),
    )


class ProcessSpanProcessor(BatchingSpanProcessor):
    """Sends finished, sampled spans to a child process that exports them, ``batch`` at a
    time, and what has waited ``delay_s`` whatever its number; at most ``max_queue``
    spans wait while the pipe is full."""

    def __init__(
        self,
        exporter: str,
        endpoint: str,
        headers: Mapping[str, str],
        service_name: str,
        *,
        batch: int,
        delay_s: float = 5.0,
        max_queue: int,
    ) -> None:
        super().__init__(
            batch=batch, delay_s=delay_s, max_queue=max_queue, thread="fermion-trace-writer"
        )
        # In the child's environment, not its command line: headers hold credentials,
        # and any user of the host can read another's command line.
        self._env = {
            **os.environ,
            _SETTINGS: json.dumps(
                {
                    "exporter": exporter,
                    "endpoint": endpoint,
                    "headers": dict(headers),
                    "service_name": service_name,
                    "gateway": os.getpid(),
                }
            ),
        }
        self._child: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._start_child()
        self._start_writer()

    @property
    def child_pid(self) -> int | None:
        """The export process's id (None while none runs)."""
        return None if self._child is None else self._child.pid

    def _item(self, span: ReadableSpan) -> Record:
        return span_record(span)

    def _full(self) -> str:
        return f"{self._max_queue} spans were already waiting for the export process"

    def _send(self, items: list[Record]) -> None:
        data = marshal.dumps(items)
        frame = _LENGTH.pack(len(data)) + data
        child = self._child
        if child is None or child.poll() is not None:
            child = self._restart()
        if child is None or child.stdin is None:
            self._lost(len(items), "the export process is not running")
            return
        try:
            fd = child.stdin.fileno()
            view = memoryview(frame)
            while view:  # blocks while the pipe is full, without the GIL
                view = view[os.write(fd, view) :]
        except (OSError, ValueError) as e:  # (a closed pipe: the child died, or shutdown)
            self._lost(len(items), f"the export process took no more ({e})")

    def _restart(self) -> subprocess.Popen[bytes] | None:
        if self._closing or time.monotonic() - self._started < _RESTART_S:
            return None
        self._stop_child(0.0)
        self._start_child()
        return self._child

    def _start_child(self) -> None:
        self._started = time.monotonic()
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", __name__], stdin=subprocess.PIPE, bufsize=0, env=self._env
            )
        except OSError as e:
            log.error("tracing: could not start the export process: %s", e)
            self._child = None
            return
        assert child.stdin is not None
        if sys.platform == "linux":  # a bigger pipe holds more while a post waits
            import fcntl

            # (Above /proc/sys/fs/pipe-max-size the default stays.)
            with contextlib.suppress(OSError):
                fcntl.fcntl(child.stdin.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
        self._child = child

    def _stop_child(self, wait_s: float) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        if child.stdin is not None:
            # The child exports what it has, then exits. (Unbuffered: closing has nothing
            # to flush into a full pipe.)
            with contextlib.suppress(OSError):
                child.stdin.close()
        try:
            child.wait(max(wait_s, 0.0))
        except subprocess.TimeoutExpired:
            child.kill()  # (a write still blocked on its pipe then fails)
            child.wait()

    def _close(self, deadline: float) -> None:
        """Give the child until ``deadline`` to export what it has and exit; then stop it."""
        self._stop_child(deadline - time.monotonic())


# --------------------------------------------------------------------------- the child


def _read(stream: Any, size: int) -> bytes | None:
    """``size`` bytes of ``stream``, or None at its end."""
    data = stream.read(size)
    return data if len(data) == size else None


def _exit_with(gateway: int) -> None:
    """End this process within a second of the end of ``gateway``, its parent (which
    may have ended already): this process then has another parent."""
    while os.getppid() == gateway:
        time.sleep(1.0)
    os._exit(0)


def main() -> int:
    """The child: export every frame read from stdin until it ends."""
    # Ctrl+C in a terminal reaches the whole process group: the gateway's stop closes
    # the pipe, and the child exports what it has before it exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = json.loads(os.environ[_SETTINGS])
    # A gateway that died without its shutdown (killed, or its stop past its grace):
    # the child goes with it, rather than posting on for a gateway that is gone.
    threading.Thread(target=_exit_with, args=(settings["gateway"],), daemon=True).start()
    with contextlib.suppress(OSError):  # the gateway's threads first, when cores are short
        os.nice(_NICE)
    from opentelemetry.sdk.resources import Resource

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # As ``tracing.configure`` builds it: OTEL_RESOURCE_ATTRIBUTES merged in.
    resource = Resource.create({"service.name": settings["service_name"]})
    exporter = otlp_exporter(settings["exporter"], settings["endpoint"], settings["headers"])
    stdin = sys.stdin.buffer
    try:
        while (head := _read(stdin, _LENGTH.size)) is not None:
            (size,) = _LENGTH.unpack(head)
            data = _read(stdin, size)
            if data is None:
                break
            spans = [readable_span(r, resource) for r in marshal.loads(data)]
            exporter.export(spans)  # (its failures are the exporter's to log)
    finally:
        exporter.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
