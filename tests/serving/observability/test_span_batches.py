"""The batch processor between the gateway's spans and the OTLP exporter: batches in
order, a partial batch after the delay or a flush, a bounded queue whose drops are
counted, and no span lost or sent twice when many threads end spans at once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from serving.observability.span_batches import ThreadSpanProcessor
from tests.helpers.otlp_collector import finished_spans


class _Recorder(SpanExporter):
    """Keeps every batch it is given; fails, raises or waits when told to."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.result = SpanExportResult.SUCCESS
        self.error: Exception | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.shut = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.gate.wait()
        if self.error is not None:
            raise self.error
        self.batches.append([s.name for s in spans])
        return self.result

    def shutdown(self) -> None:
        self.shut = True

    @property
    def names(self) -> list[str]:
        return [name for batch in self.batches for name in batch]


@contextmanager
def _processor(
    batch: int = 4, delay_s: float = 30.0, max_queue: int = 1000
) -> Iterator[tuple[ThreadSpanProcessor, _Recorder]]:
    recorder = _Recorder()
    processor = ThreadSpanProcessor(recorder, batch=batch, delay_s=delay_s, max_queue=max_queue)
    try:
        yield processor, recorder
    finally:
        recorder.gate.set()
        processor.shutdown(timeout_millis=5_000)


def _wait(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


SPANS = finished_spans(40)


def test_full_batches_go_at_once_in_order_and_a_flush_sends_the_rest() -> None:
    with _processor(batch=4) as (processor, recorder):
        for span in SPANS[:10]:
            processor.on_end(span)
        _wait(lambda: len(recorder.batches) == 2)
        assert recorder.batches == [[f"request-{i}" for i in r] for r in (range(4), range(4, 8))]
        assert processor.force_flush(5_000)
        assert recorder.batches[-1] == ["request-8", "request-9"]
        assert processor.dropped == 0


def test_a_partial_batch_goes_after_the_delay() -> None:
    with _processor(batch=100, delay_s=0.2) as (processor, recorder):
        processor.on_end(SPANS[0])
        _wait(lambda: recorder.names == ["request-0"], seconds=5)


def test_a_full_queue_drops_and_counts_what_comes_after_it() -> None:
    with _processor(batch=4, max_queue=8) as (processor, recorder):
        recorder.gate.clear()  # the exporter stops taking spans
        for span in SPANS[:4]:
            processor.on_end(span)
        _wait(lambda: len(processor._queue) == 0)  # the writer holds that batch
        for span in SPANS[4:20]:
            processor.on_end(span)
        assert processor.dropped == 8  # 8 held in the queue, 8 had no room
        recorder.gate.set()
        assert processor.force_flush(5_000)
        assert recorder.names == [f"request-{i}" for i in range(12)]


def test_a_failed_or_raising_export_counts_its_spans_and_the_next_batch_goes() -> None:
    with _processor(batch=2) as (processor, recorder):
        recorder.result = SpanExportResult.FAILURE
        processor.on_end(SPANS[0])
        processor.on_end(SPANS[1])
        assert processor.force_flush(5_000)
        assert processor.dropped == 2
        recorder.result = SpanExportResult.SUCCESS
        recorder.error = RuntimeError("exporter bug")
        processor.on_end(SPANS[2])
        processor.on_end(SPANS[3])
        assert processor.force_flush(5_000)
        assert processor.dropped == 4
        recorder.error = None
        processor.on_end(SPANS[4])
        processor.on_end(SPANS[5])
        assert processor.force_flush(5_000)
        assert recorder.names[-2:] == ["request-4", "request-5"]


def test_shutdown_sends_what_is_left_and_counts_what_comes_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = _Recorder()
    processor = ThreadSpanProcessor(recorder, batch=64, delay_s=30.0, max_queue=1000)
    for span in SPANS[:3]:
        processor.on_end(span)
    processor.shutdown(timeout_millis=5_000)
    assert recorder.names == ["request-0", "request-1", "request-2"]
    assert recorder.shut
    with caplog.at_level(logging.INFO):
        processor.on_end(SPANS[3])
    assert processor.dropped == 1
    assert not caplog.records  # a request ending during the stop is no news
    assert not processor.force_flush(1_000)


def test_spans_ended_by_many_threads_at_once_are_each_sent_once_or_counted() -> None:
    spans = finished_spans(500)
    with _processor(batch=7, max_queue=64) as (processor, recorder):
        start = threading.Barrier(8)

        def end(part: Sequence[ReadableSpan]) -> None:
            start.wait()
            for span in part:
                processor.on_end(span)

        threads = [threading.Thread(target=end, args=(spans[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert processor.force_flush(10_000)
        sent = recorder.names
        assert len(sent) == len(set(sent))
        assert len(sent) + processor.dropped == 500
        assert all(len(batch) <= 7 for batch in recorder.batches)


def test_a_batch_bigger_than_the_queue_goes_when_the_queue_is_full() -> None:
    with _processor(batch=64, max_queue=5) as (processor, recorder):
        for span in SPANS[:5]:
            processor.on_end(span)
        _wait(lambda: recorder.names == [f"request-{i}" for i in range(5)])
        assert processor.dropped == 0
