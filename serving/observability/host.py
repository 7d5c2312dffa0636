"""One host's figures whichever worker answers: ``fermion serve --workers N``.

Each worker process counts its own requests (plain counters, see counters.py). A
scrape of ``/metrics`` (or of the statistics extension) reaching any worker asks its
siblings, over a Unix socket each, for their own figures at that moment and adds them
up: counters, histograms and summed gauges add, other gauges take the largest. Asking
at scrape time keeps counts exact (nothing is published on a timer that a scrape
could run ahead of) and costs nothing between scrapes. A sibling that does not answer
within a second is left out of that scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["HostSiblings", "merge_prometheus", "merge_stats"]

log = logging.getLogger("fermion.workers")

#: Gauges that add up over the workers of a host; any other gauge takes the largest value.
SUMMED_GAUGES = frozenset(
    {
        "fermion_inflight_requests",
        "fermion_queue_depth",
        "fermion_queue_capacity",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    }
)
#: Gauges that take the smallest value (a start time, whether every worker sees the store,
#: readiness).
_MIN_GAUGES = frozenset(
    {
        "process_start_time_seconds",
        "fermion_control_store_up",
        # The host is ready only while every worker is (a probe may reach any of them).
        "fermion_ready",
        "fermion_version_ready",
    }
)
_ASK_TIMEOUT_S = 1.0

#: A request name -> what answers it, given the request's arguments.
Handler = Callable[[list[str]], bytes]


def _combine(kind: str, sample: str, old: float, new: float) -> float:
    if sample.endswith("_created") or kind in _MIN_GAUGES:
        return min(old, new)
    if kind == "max":
        return max(old, new)
    return old + new


def merge_prometheus(texts: Iterable[bytes]) -> bytes:
    """Several workers' Prometheus text expositions as one host's."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            if family.type == "gauge":
                kind = family.name if family.name in _MIN_GAUGES else "max"
                kind = "sum" if family.name in SUMMED_GAUGES else kind
            else:
                kind = "sum"
            seen = values[family.name]
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                seen[key] = (
                    s.value if key not in seen else _combine(kind, s.name, seen[key], s.value)
                )
    registry = CollectorRegistry(auto_describe=False)

    class _Merged:
        def collect(self) -> Iterator[Metric]:
            for name, family in families.items():
                for (sample, labels), value in values[name].items():
                    family.add_sample(sample, dict(labels), value)
                yield family

    registry.register(_Merged())
    return generate_latest(registry)


#: Fields naming a statistics row: kept, never added.
_ROW_KEYS = ("name", "version", "batch_size")


def _merge_value(key: str, old: Any, new: Any) -> Any:
    if key in _ROW_KEYS:
        return old if old is not None else new
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: _merge_value(k, old.get(k), new.get(k)) for k in {**old, **new}}
    if old is None or new is None:
        return new if old is None else old
    if isinstance(old, list) and isinstance(new, list):
        return _merge_rows(old + new)
    if isinstance(old, bool) or not isinstance(old, int | float):
        return old
    return max(old, new) if key.startswith("last_") else old + new


def _merge_rows(rows: list[Any]) -> list[Any]:
    merged: dict[Any, Any] = {}
    for row in rows:
        if not isinstance(row, dict):
            return rows
        key = tuple(row.get(k) for k in _ROW_KEYS)
        merged[key] = _merge_value("", merged[key], row) if key in merged else row
    return list(merged.values())


def merge_stats(documents: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Several workers' statistics-extension answers as one host's (rows by model version)."""
    out: dict[str, Any] = {}
    for doc in documents:
        out = _merge_value("", out, doc) if out else doc
    return out


class HostSiblings:
    """This worker's socket for its siblings' questions, and theirs for its own."""

    def __init__(self, run_dir: Path, index: int, count: int) -> None:
        self.index = index
        self._paths = [run_dir / f"worker-{i}.sock" for i in range(count)]
        self._server: asyncio.Server | None = None
        self._handlers: dict[str, Handler] = {}

    async def serve(self, handlers: dict[str, Handler]) -> None:
        """Answer siblings' questions (one line: a name and its arguments) with ``handlers``."""
        self._handlers = handlers
        path = self._paths[self.index]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by the worker this one replaces
        self._server = await asyncio.start_unix_server(self._answer, path=str(path))

    async def close(self) -> None:
        """Stop answering."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline()).decode().split()
            handler = self._handlers.get(line[0]) if line else None
            writer.write(handler(line[1:]) if handler is not None else b"")
            await writer.drain()
        except Exception:  # a question must never take the worker down
            log.exception("answering a sibling worker failed")
        finally:
            writer.close()

    async def ask(self, *request: str) -> list[bytes]:
        """Every sibling's answer to ``request`` (those that do not answer are left out)."""
        paths = [p for i, p in enumerate(self._paths) if i != self.index]
        answers = await asyncio.gather(*(self._ask_one(p, request) for p in paths))
        return [a for a in answers if a is not None]

    @staticmethod
    async def _ask_one(path: Path, request: tuple[str, ...]) -> bytes | None:
        try:
            async with asyncio.timeout(_ASK_TIMEOUT_S):
                reader, writer = await asyncio.open_unix_connection(str(path))
                try:
                    writer.write((" ".join(request) + "\n").encode())
                    await writer.drain()
                    return await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError) as e:
            log.warning("sibling worker at %s did not answer: %s", path, e)
            return None
