"""Where replicas live. The gateway talks to every backend through ``Backend``.

Backends load by name from a table, so the Ray backend (and Ray itself) is
imported only when chosen.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from model_store.importer import import_from_string
from model_store.manifest import ModelManifest
from model_store.store import ModelStore
from serving.config import FermionConfig
from serving.inference.batcher import InlineRunner, ThreadedRunner

__all__ = ["BACKENDS", "Backend", "create_backend"]

#: Backend name -> "module:Class".
BACKENDS: dict[str, str] = {
    "local": "serving.inference.backends.local:LocalBackend",
    "ray": "serving.inference.backends.ray:RayBackend",
    "remote": "serving.inference.backends.remote:RemoteBackend",
}


class Backend(ABC):
    """Hosts replicas of model versions and runs whole batches on them."""

    @abstractmethod
    async def start(self) -> None:
        """Acquire what the backend needs (threads, a cluster)."""

    @abstractmethod
    async def stop(self) -> None:
        """Release everything ``start`` and ``load`` acquired."""

    @abstractmethod
    async def load(self, manifest: ModelManifest) -> dict[str, Any]:
        """Load replicas of this version; return once they are warm, with a description.

        Raises when no replica can serve it (the message says why).
        """

    @abstractmethod
    async def unload(self, name: str, version: int) -> None:
        """Remove this version's replicas (after the batcher drained)."""

    @abstractmethod
    async def infer_batch(
        self, name: str, version: int, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Compute one batch on a replica of this version."""

    def inline_runner(self, name: str, version: int) -> InlineRunner | None:
        """What runs a lone batch of this version on the event loop; None: never."""
        return None

    def threaded_runner(self, name: str, version: int) -> ThreadedRunner | None:
        """This version's worker threads, when the backend computes on its own threads
        (the batcher then starts batches from them); None: batches go through
        ``infer_batch``."""
        return None

    def replica_counts(self) -> dict[tuple[str, int], int]:
        """Running replicas per loaded (model, version), as last seen; never blocks.

        Empty when the backend cannot tell.
        """
        return {}


def create_backend(config: FermionConfig, store: ModelStore, name: str | None = None) -> Backend:
    """Build the backend ``name`` (None: the one named in ``config``)."""
    name = config.backend if name is None else name
    spec = BACKENDS.get(name)
    if spec is None:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}")
    try:
        cls = import_from_string(spec)
    except ImportError as e:
        raise RuntimeError(f"backend {name!r} is not available: {e}") from e
    backend: Backend = cls(config, store)
    return backend
