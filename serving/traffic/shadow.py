"""Shadow traffic: mirror routed requests to another version and compare its outputs.

The client never waits for a shadow: the copy is queued after the primary answered,
in a task of its own, and its result or failure only updates figures and metrics.
Shadow work is shed first: no copy is made while the shadow's or the primary's
queue is ``max_queue_depth`` deep or too many copies are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterator, Mapping

import numpy as np
from opentelemetry import trace
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from serving.config import ShadowConfig
from serving.errors import FermionError
from serving.inference.repository import ModelRepository, ServedVersion, VersionBatcher
from serving.observability.tracing import current_tracer
from serving.traffic.windows import ShadowFigures, ShadowWindow

__all__ = ["ShadowMirror", "compare_outputs"]

log = logging.getLogger("fermion.shadow")

_SHED = ShadowFigures(shed=1)
_FAILED = ShadowFigures(mirrored=1, errors=1)


def compare_outputs(
    primary: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]
) -> ShadowFigures:
    """Compare one request's outputs: largest absolute difference and top-1 agreement.

    Top-1 agreement is taken on the first output shaped ``[rows, classes > 1]``.
    Outputs missing from the shadow, or of another shape, differ by infinity.
    """
    max_diff = 0.0
    rows = agree = top1_rows = 0
    for name, a in primary.items():
        b = shadow.get(name)
        if b is None or np.shape(a) != np.shape(b):
            max_diff = float("inf")
            continue
        a_arr, b_arr = np.asarray(a), np.asarray(b)
        if a_arr.dtype == np.object_ or b_arr.dtype == np.object_:
            if not np.array_equal(a_arr, b_arr):
                max_diff = float("inf")
            continue
        if a_arr.size:
            diff = float(np.max(np.abs(a_arr.astype(np.float64) - b_arr.astype(np.float64))))
            max_diff = max(max_diff, diff if diff == diff else float("inf"))
        rows = max(rows, a_arr.shape[0] if a_arr.ndim else 1)
        if top1_rows == 0 and a_arr.ndim == 2 and a_arr.shape[1] > 1 and a_arr.shape[0] > 0:
            top1_rows = a_arr.shape[0]
            agree = int(np.count_nonzero(a_arr.argmax(axis=1) == b_arr.argmax(axis=1)))
    return ShadowFigures(
        mirrored=1,
        rows=rows,
        agree_rows=agree,
        top1_rows=top1_rows,
        max_abs_diff=max_diff,
    )


class ShadowMirror:
    """Mirrors requests to shadow versions in the background and keeps their figures."""

    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository
        self._tasks: set[asyncio.Task[None]] = set()
        self._windows: dict[tuple[str, int, int], ShadowWindow] = {}

    @property
    def in_flight(self) -> int:
        """Shadow requests queued or running now."""
        return len(self._tasks)

    def window(self, model: str, primary: int, shadow: int) -> ShadowWindow:
        """The figures of one shadow pair."""
        key = (model, primary, shadow)
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = ShadowWindow()
        return w

    def windows(self, model: str) -> dict[tuple[int, int], ShadowWindow]:
        """Every shadow pair of ``model`` as (primary, shadow) -> figures."""
        return {(p, s): w for (m, p, s), w in self._windows.items() if m == model}

    def mirror(
        self,
        model: str,
        config: ShadowConfig,
        primary: ServedVersion,
        inputs: dict[str, np.ndarray],
        rows: int,
        primary_outputs: dict[str, np.ndarray],
    ) -> bool:
        """Maybe queue a copy of a request that ``primary`` answered; True if queued."""
        if config.percent < 100.0 and random.random() * 100.0 >= config.percent:
            return False
        window = self.window(model, primary.version, config.version)
        batcher = self._shadow_batcher(model, config.version)
        primary_depth = primary.batcher.queue_depth if primary.batcher is not None else 0
        if (
            batcher is None
            or len(self._tasks) >= config.max_in_flight
            or batcher.queue_depth >= config.max_queue_depth
            or primary_depth >= config.max_queue_depth
        ):
            window.add(_SHED)
            return False
        task = asyncio.get_running_loop().create_task(
            self._run(
                batcher,
                window,
                (model, primary.version, config.version),
                inputs,
                rows,
                primary_outputs,
            )
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _shadow_batcher(self, model: str, version: int) -> VersionBatcher | None:
        try:
            _, batcher = self._repository.resolve(model, str(version))
        except FermionError:
            return None
        return batcher

    async def _run(
        self,
        batcher: VersionBatcher,
        window: ShadowWindow,
        pair: tuple[str, int, int],
        inputs: dict[str, np.ndarray],
        rows: int,
        primary_outputs: dict[str, np.ndarray],
    ) -> None:
        # The request's span may have ended (the client has its answer): follow its
        # sampling decision rather than whether it still records.
        tracer = current_tracer()
        labels = (pair[0], str(pair[1]), str(pair[2]))
        if (
            tracer is not None
            and not trace.get_current_span().get_span_context().trace_flags.sampled
        ):
            tracer = None
        span = (
            tracer.start_as_current_span(
                "fermion.shadow",
                attributes={
                    "fermion.model": labels[0],
                    "fermion.version": labels[1],
                    "fermion.shadow_version": labels[2],
                    "fermion.rows": rows,
                },
            )
            if tracer is not None
            else contextlib.nullcontext()
        )
        with span:
            try:
                # The lowest priority level: with priority queues, clients go first.
                outputs = await batcher.submit(inputs, rows, priority=batcher.priority_levels)
                figures = compare_outputs(primary_outputs, outputs)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failing shadow only counts as a failure
                window.add(_FAILED)
                log.debug("shadow %s version %s failed: %s", labels[0], labels[2], e)
                return
        window.add(figures)

    def collect(self) -> Iterator[Metric]:
        """The shadow families, from every pair's figures since the gateway started."""
        pair = ["model", "primary", "shadow"]
        requests = CounterMetricFamily(
            "fermion_shadow_requests",
            "Mirrored requests by outcome: ok, error (the shadow failed), shed (not mirrored).",
            labels=[*pair, "outcome"],
        )
        rows = CounterMetricFamily(
            "fermion_shadow_rows",
            "Rows compared between primary and shadow; agree: whether their top-1 class agreed.",
            labels=[*pair, "agree"],
        )
        diffs = HistogramMetricFamily(
            "fermion_shadow_max_abs_diff",
            "Largest absolute difference between primary and shadow outputs, per mirrored request.",
            labels=pair,
        )
        agreement = GaugeMetricFamily(
            "fermion_shadow_top1_agreement",
            "Share of compared rows whose top-1 class agreed, since the gateway started.",
            labels=pair,
        )
        for (model, primary, shadow), w in sorted(self._windows.items()):
            labels = [model, str(primary), str(shadow)]
            t = w.total
            for outcome, count in (
                ("ok", t.mirrored - t.errors),
                ("error", t.errors),
                ("shed", t.shed),
            ):
                if count:
                    requests.add_metric([*labels, outcome], count)
            if t.top1_rows:
                rows.add_metric([*labels, "true"], t.agree_rows)
                rows.add_metric([*labels, "false"], t.top1_rows - t.agree_rows)
            if any(w.diffs.counts):
                diffs.add_metric(labels, w.diffs.buckets(), w.diffs.total)
            share = t.top1_agreement
            if share is not None:
                agreement.add_metric(labels, share)
        yield requests
        yield rows
        yield diffs
        yield agreement

    async def stop(self) -> None:
        """Cancel every shadow copy still queued or running (clients never wait on them)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.difference_update(tasks)
