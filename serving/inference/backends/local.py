"""Backend ``local``: replicas in the gateway process, inference in worker threads."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from model_store.manifest import ModelManifest
from model_store.store import ModelStore
from serving.config import FermionConfig
from serving.errors import ModelNotReady
from serving.inference.backends import Backend
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
        replica = self._replicas.get((name, version))
        if replica is None or self._pool is None:
            raise ModelNotReady(f"model {name} version {version} has no replica")
        # The executor itself runs in the pool: no frame of the replica in between.
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, replica.executor.run, inputs
        )
