"""Captured requests, written by a background thread to rotating JSONL files.

The request path only hands a record to a bounded queue (never blocking: a full queue
drops the record and counts it). One thread encodes records as JSON lines and appends
them to ``<dir>/capture-<pid>-<seq>.jsonl``; a file that passes ``max_file_bytes`` is
closed and the next one opened, and the oldest files of the folder are removed so that
at most ``max_files`` remain. A write that fails (a full disk, a folder gone) drops the
records it carried, is counted and logged, and is retried a second later: capture never
fails or slows a request. ``fermion_capture_records_total{outcome}`` counts records
written, dropped (queue full) and failed (write error).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final

import orjson
from prometheus_client.metrics_core import CounterMetricFamily, Metric

__all__ = ["CAPTURE_GLOB", "CaptureWriter", "CapturedBody", "encode_body"]

#: The capture files of a folder (``fermion loadtest replay DIR`` reads them all).
CAPTURE_GLOB: Final = "capture-*.jsonl"
_RETRY_S: Final = 1.0
_LOG_EVERY_S: Final = 60.0
_BATCH: Final = 256
_STOP: Final = object()

log = logging.getLogger("fermion.capture")


def encode_body(key: str, data: bytes | None, size: int, truncated: bool) -> dict[str, Any]:
    """A body as record fields: ``key`` (UTF-8 text) or ``key_b64``, ``key_bytes`` and
    ``key_truncated`` (then without the body: a cut body cannot be replayed)."""
    out: dict[str, Any] = {f"{key}_bytes": size}
    if truncated or data is None:
        out[f"{key}_truncated"] = True
        return out
    try:
        out[key] = data.decode("utf-8")
    except UnicodeDecodeError:
        out[f"{key}_b64"] = base64.b64encode(data).decode("ascii")
    return out


class CapturedBody:
    """A body's chunks as they passed, up to a cap (beyond it: dropped and marked cut).

    Kept by reference on the request path; joined and encoded by the writer's thread.
    """

    __slots__ = ("cap", "chunks", "size", "truncated")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        """One more chunk of the body."""
        self.size += len(chunk)
        if self.size > self.cap:
            self.truncated = True
            self.chunks.clear()
        elif chunk:
            self.chunks.append(chunk)

    def fields(self, key: str) -> dict[str, Any]:
        """The record fields of this body under ``key`` (see ``encode_body``)."""
        data = None if self.truncated else b"".join(self.chunks)
        return encode_body(key, data, self.size, self.truncated)


def _encode(record: dict[str, Any]) -> bytes:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, CapturedBody):
            out.update(value.fields(key))
        else:
            out[key] = value
    return orjson.dumps(out) + b"\n"


class CaptureWriter:
    """Appends records to rotating JSONL files from a thread of its own."""

    def __init__(
        self,
        directory: Path,
        *,
        max_file_bytes: int,
        max_files: int,
        queue_size: int = 1024,
    ) -> None:
        self.directory = directory
        self._max_file_bytes = max_file_bytes
        self._max_files = max_files
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._file: IO[bytes] | None = None
        self._size = 0
        self._seq = 0
        self._retry_at = 0.0
        self._logged_at = -_LOG_EVERY_S
        self.written = self.dropped = self.failed = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, record: dict[str, Any]) -> None:
        """Queue ``record`` for writing; drop it (counted) when the queue is full."""
        if self._thread is None:
            self._start()
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="fermion-capture", daemon=True
                )
                self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout_s``), then stop the thread."""
        thread = self._thread
        if thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout_s)
        thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < _BATCH:
                    batch.append(self._queue.get_nowait())
            stop = any(r is _STOP for r in batch)
            lines = []
            for record in batch:
                if record is _STOP:
                    continue
                try:
                    lines.append(_encode(record))
                except (TypeError, ValueError, orjson.JSONEncodeError):
                    self.failed += 1
            self._write(lines)
            if stop:
                self._close_file()
                return

    def _write(self, lines: list[bytes]) -> None:
        if time.monotonic() < self._retry_at:
            self.failed += len(lines)
            return
        pending = list(lines)
        chunk: list[bytes] = []
        try:
            while pending:
                chunk = []
                if self._file is None:
                    self._open()
                assert self._file is not None
                room = self._max_file_bytes - self._size
                while pending and ((not chunk and self._size == 0) or len(pending[0]) <= room):
                    room -= len(pending[0])
                    chunk.append(pending.pop(0))
                if chunk:
                    data = b"".join(chunk)
                    done = 0
                    while done < len(data):
                        done += self._file.write(data[done:]) or 0
                    self._size += len(data)
                    self.written += len(chunk)
                    chunk = []
                if pending or self._size >= self._max_file_bytes:
                    self._close_file()
                    self._seq += 1
        except OSError as e:
            self.failed += len(pending) + len(chunk)
            self._close_file()
            self._retry_at = time.monotonic() + _RETRY_S
            now = time.monotonic()
            if now - self._logged_at >= _LOG_EVERY_S:
                self._logged_at = now
                log.warning("capture: cannot write to %s (%s): records dropped", self.directory, e)

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._seq == 0:
            self._seq = 1
        self._prune(keep=self._max_files - 1)
        path = self.directory / f"capture-{os.getpid()}-{self._seq:06d}.jsonl"
        self._file = path.open("ab", buffering=0)
        self._size = self._file.tell()

    def _close_file(self) -> None:
        f, self._file = self._file, None
        self._size = 0
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()

    def _prune(self, keep: int) -> None:
        files = []
        for path in self.directory.glob(CAPTURE_GLOB):
            with contextlib.suppress(OSError):
                files.append((path.stat().st_mtime, path.name, path))
        files.sort()
        for _, _, path in files[: max(len(files) - keep, 0)]:
            with contextlib.suppress(OSError):
                path.unlink()

    def collect(self) -> Iterator[Metric]:
        """``fermion_capture_records_total`` by outcome."""
        family = CounterMetricFamily(
            "fermion_capture_records",
            "Captured requests by outcome: written, dropped (queue full), failed (write error).",
            labels=["outcome"],
        )
        for outcome, count in (
            ("written", self.written),
            ("dropped", self.dropped),
            ("failed", self.failed),
        ):
            family.add_metric([outcome], count)
        yield family
