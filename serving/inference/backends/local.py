"""Backend ``local``: replicas in the gateway process, inference in worker threads.

The pool's threads start a version's batches themselves (``threaded_runner``): a thread
that finishes a batch takes the next one from the batcher's queue, without waiting for
the event loop to hear of the first.

With ``local.inline_max_ms`` (opt-in), a lone batch (its version's traffic one request
at a time, nothing in the pool) of a version whose last run was that short runs on the
event loop instead: handing it to a thread and its answer back costs two wake-ups,
more than a small model's compute. The loop then blocks for up to that long.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from model_store.manifest import ModelManifest
from model_store.store import ModelStore
from serving.config import FermionConfig
from serving.errors import ModelNotReady
from serving.inference.backends import Backend
from serving.inference.batcher import InlineRunner, ThreadedRunner
from serving.inference.executors import ExecutorOptions
from serving.inference.replica import ModelReplica

__all__ = ["LocalBackend"]


class LocalBackend(Backend):
    """One replica per model version, run by a shared pool of inference threads."""

    def __init__(self, config: FermionConfig, store: ModelStore) -> None:
        self._config = config
        self._store = store
        self._replicas: dict[tuple[str, int], ModelReplica] = {}
        self._pool: ThreadPoolExecutor | None = None
        #: Batches in the pool now (a lone batch runs inline only when it is 0).
        self._in_pool = 0
        #: Guards ``_in_pool``: the pool's threads count their own batches.
        self._count_lock = threading.Lock()
        self._inline_max_ns = int(config.local.inline_max_ms * 1e6)
        #: Versions whose last run took at most ``inline_max_ms`` (none before a run).
        self._short: set[tuple[str, int]] = set()

    async def start(self) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=self._config.local.inference_threads, thread_name_prefix="fermion-infer"
        )

    async def stop(self) -> None:
        for replica in self._replicas.values():
            replica.close()
        self._replicas.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    async def load(self, manifest: ModelManifest) -> dict[str, Any]:
        ex = self._config.executor_for(manifest.name)
        options = ExecutorOptions(intra_op_threads=ex.intra_op_threads)
        replica = await asyncio.to_thread(
            ModelReplica, self._store, manifest, prefer=ex.prefer, options=options
        )
        old = self._replicas.pop((manifest.name, manifest.version), None)
        self._replicas[(manifest.name, manifest.version)] = replica
        self._short.discard((manifest.name, manifest.version))
        if old is not None:
            old.close()
        return {"backend": "local", "replicas": 1, **replica.describe()}

    def replica_counts(self) -> dict[tuple[str, int], int]:
        """One replica per loaded version."""
        return dict.fromkeys(self._replicas, 1)

    async def unload(self, name: str, version: int) -> None:
        replica = self._replicas.pop((name, version), None)
        if replica is not None:
            replica.close()

    async def infer_batch(
        self, name: str, version: int, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        key = (name, version)
        replica = self._replicas.get(key)
        if replica is None or self._pool is None:
            raise ModelNotReady(f"model {name} version {version} has no replica")
        self._count(1)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, self._run, key, replica, inputs
            )
        finally:
            self._count(-1)

    def threaded_runner(self, name: str, version: int) -> ThreadedRunner:
        """The pool's threads: they start this version's batches themselves."""
        return ThreadedRunner(self._submit, functools.partial(self._run_in_pool, (name, version)))

    def _submit(self, job: Callable[[], None]) -> None:
        """Hand ``job`` to the pool, counted in ``_in_pool`` from now, as ``infer_batch``
        counts its batches (one waiting for a thread is in the pool too)."""
        pool = self._pool
        if pool is None:
            raise ModelNotReady("the inference pool is stopped")
        self._count(1)
        try:
            pool.submit(self._counted, job)
        except BaseException:
            self._count(-1)
            raise

    def _counted(self, job: Callable[[], None]) -> None:
        try:
            job()
        finally:
            self._count(-1)

    def _count(self, change: int) -> None:
        with self._count_lock:
            self._in_pool += change

    def _run_in_pool(
        self, key: tuple[str, int], inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """On a pool thread: run the version's current replica."""
        replica = self._replicas.get(key)
        if replica is None:
            raise ModelNotReady(f"model {key[0]} version {key[1]} has no replica")
        return self._run(key, replica, inputs)

    def inline_runner(self, name: str, version: int) -> InlineRunner | None:
        if self._inline_max_ns <= 0:
            return None
        return functools.partial(self._run_inline, (name, version))

    def _run_inline(
        self, key: tuple[str, int], inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray] | None:
        """The batch run here and now, or None when the pool is busy or its last run was
        long (or it never ran)."""
        replica = self._replicas.get(key)
        if replica is None or self._in_pool or key not in self._short:
            return None
        return self._run(key, replica, inputs)

    def _run(
        self, key: tuple[str, int], replica: ModelReplica, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Run the executor (on whichever thread calls) and note whether it was short."""
        started = time.perf_counter_ns()
        try:
            return replica.executor.run(inputs)
        finally:
            if time.perf_counter_ns() - started <= self._inline_max_ns:
                self._short.add(key)
            else:
                self._short.discard(key)
