"""The trained demo model as the session fixture ``demo`` publishes it."""

from __future__ import annotations

from dataclasses import dataclass

from model_store.manifest import ModelManifest
from model_store.store import ModelStore

__all__ = ["PublishedDemo"]


@dataclass(frozen=True)
class PublishedDemo:
    """The demo published into a store of its own, and how long that took."""

    store: ModelStore
    manifests: list[ModelManifest]
    seconds: float
