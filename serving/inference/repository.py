"""The served model versions: which exist, their state, their batcher; load and unload."""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from model_store.manifest import ModelManifest
from model_store.store import ModelStore, StoreError
from serving.config import FermionConfig
from serving.errors import FermionError, ModelNotFound, ModelNotReady
from serving.inference.backends import Backend
from serving.inference.batcher import DynamicBatcher
from serving.observability.counters import VersionCounter, VersionCounters

__all__ = ["ModelRepository", "NotReady", "Readiness", "ServedVersion", "VersionState"]

log = logging.getLogger("fermion.repository")


class VersionState(StrEnum):
    """Life of a served version (the V2 repository index's ``state``)."""

    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADING = "UNLOADING"


@dataclass(frozen=True)
class NotReady:
    """A model (``version`` None: the whole model) that is not ready, and why."""

    model: str
    version: int | None
    state: str
    reason: str

    def describe(self) -> str:
        """One line: which model or version, its state, and why."""
        which = self.model if self.version is None else f"{self.model} version {self.version}"
        return f"{which} {self.state.lower()}: {self.reason}" if self.reason else which


@dataclass(frozen=True)
class Readiness:
    """Whether the gateway is ready, and what is not (named even when ready anyway)."""

    ready: bool
    problems: tuple[NotReady, ...] = ()

    def reason(self) -> str:
        """Every problem, one after another."""
        return "; ".join(p.describe() for p in self.problems)


@dataclass
class ServedVersion:
    """One model version as the gateway serves it."""

    manifest: ModelManifest
    #: Every count of this version (kept across reloads, shared with its batcher).
    counter: VersionCounter
    state: VersionState = VersionState.LOADING
    reason: str = ""
    batcher: DynamicBatcher | None = None
    replica: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    def ready_batcher(self) -> DynamicBatcher:
        """The batcher of this version when it is READY; ModelNotReady (503) otherwise."""
        if self.state is not VersionState.READY or self.batcher is None:
            detail = f": {self.reason}" if self.reason else ""
            raise ModelNotReady(
                f"model {self.name} version {self.version} is {self.state.value.lower()}{detail}"
            )
        return self.batcher


class ModelRepository:
    """Keeps the served versions of every model and their batchers, over one backend."""

    def __init__(
        self,
        config: FermionConfig,
        store: ModelStore,
        backend: Backend,
        *,
        counters: VersionCounters | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._backend = backend
        #: Every served version's counter (requests, batches), for metrics and canaries.
        self.counters = counters if counters is not None else VersionCounters()
        self._models: dict[str, dict[int, ServedVersion]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: Models that could not be loaded at all (e.g. not in the store) -> why.
        self._failed: dict[str, str] = {}
        self._started = False

    @property
    def store(self) -> ModelStore:
        return self._store

    def configured_models(self) -> list[str]:
        """Models served at start: the config's, or every model in the store."""
        return sorted(self._config.models) if self._config.models else self._store.models()

    async def start(self) -> None:
        """Load every configured model; a model that fails stays UNAVAILABLE with its reason."""
        for name in self.configured_models():
            try:
                await self.load_model(name)
            except Exception as e:  # one broken model must not keep the others down
                log.error("model %s failed to load: %s", name, e)
                self._failed[name] = e.message if isinstance(e, FermionError) else str(e)
        self._started = True

    async def stop(self) -> None:
        """Drain and unload everything."""
        for name in list(self._models):
            await self.unload_model(name)

    @property
    def ready(self) -> bool:
        """Whether the gateway is ready (see ``readiness``)."""
        return self.readiness().ready

    def readiness(self) -> Readiness:
        """Ready, by ``server.strict_readiness``, and every model or version that is not.

        Never ready before start has finished or with nothing to serve. Strict (the
        default, as Triton's): not ready while any configured or store-listed model or
        version failed to load. Otherwise: ready once every served model has a READY
        version; the failed ones are still named. A version loading or unloading beside a
        READY one (a push, a reload) changes nothing.
        """
        if not self._started:
            return Readiness(False, (NotReady("", None, "LOADING", "models are loading"),))
        problems = [NotReady(n, None, "UNAVAILABLE", r) for n, r in sorted(self._failed.items())]
        unserved = False
        for name, versions in sorted(self._models.items()):
            serving = any(sv.state is VersionState.READY for sv in versions.values())
            for sv in sorted(versions.values(), key=lambda sv: sv.version):
                if sv.state is VersionState.UNAVAILABLE or (
                    not serving and sv.state is not VersionState.READY
                ):
                    problems.append(NotReady(name, sv.version, sv.state.value, sv.reason))
            unserved = unserved or not serving
        if not self._models and not self._failed:
            root = self._store.root
            why = "does not exist" if not root.is_dir() else "holds no published model"
            problems.append(NotReady("", None, "UNAVAILABLE", f"store {root} {why}"))
            return Readiness(False, tuple(problems))
        if self._config.server.strict_readiness:
            return Readiness(not problems, tuple(problems))
        return Readiness(bool(self._models) and not unserved, tuple(problems))

    def versions_to_serve(self, name: str) -> list[int]:
        """The versions of ``name`` this gateway serves: its version policy over the store."""
        available = self._store.versions(name)
        if not available:
            raise ModelNotFound(f"model {name} has no published version in the store")
        policy = self._config.models[name].versions if name in self._config.models else "all"
        if policy == "all":
            return available
        if policy == "latest":
            return available[-1:]
        missing = sorted(set(policy) - set(available))
        if missing:
            raise ModelNotFound(f"model {name} has no version(s) {missing} in the store")
        return sorted(policy)

    async def load_model(self, name: str) -> list[ServedVersion]:
        """(Re)load ``name`` from the store; versions no longer wanted are drained and unloaded."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                wanted = self.versions_to_serve(name)
                manifests = [self._store.manifest(name, v) for v in wanted]
            except StoreError as e:
                raise ModelNotFound(str(e)) from e
            self._failed.pop(name, None)
            current = self._models.setdefault(name, {})
            loaded: list[ServedVersion] = []
            for manifest in manifests:
                existing = current.get(manifest.version)
                if existing is not None and existing.state is VersionState.READY:
                    loaded.append(existing)
                    continue
                sv = ServedVersion(manifest, self.counters.version(name, manifest.version))
                current[manifest.version] = sv
                await self._load_version(sv)
                loaded.append(sv)
            for version in sorted(set(current) - set(wanted)):
                await self._unload_version(current, version)
            return loaded

    async def _load_version(self, sv: ServedVersion) -> None:
        try:
            sv.replica = await self._backend.load(sv.manifest)
        except Exception as e:
            sv.state = VersionState.UNAVAILABLE
            sv.reason = str(e)
            log.error("model %s version %s unavailable: %s", sv.name, sv.version, e)
            return
        b = self._config.batching_for(sv.name)
        batched = sv.manifest.max_batch_size > 0
        max_batch = min(b.max_batch_size, sv.manifest.max_batch_size) if batched else 1
        name, version = sv.name, sv.version
        sv.batcher = DynamicBatcher(
            # The batcher calls the backend itself: no frame of this module in between.
            functools.partial(self._backend.infer_batch, name, version),
            max_batch_size=max_batch,
            max_queue_delay_s=b.max_queue_delay_ms / 1000.0,
            max_queue_size=b.max_queue_size,
            max_concurrent_batches=b.max_concurrent_batches,
            batched=batched,
            priority_levels=b.priority_levels,
            default_priority_level=b.default_priority_level,
            model=name,
            version=str(version),
            stats=sv.counter,
        )
        sv.state = VersionState.READY
        sv.reason = ""
        log.info("model %s version %s ready (%s)", sv.name, sv.version, sv.replica.get("target"))

    async def _unload_version(self, versions: dict[int, ServedVersion], version: int) -> None:
        sv = versions[version]
        sv.state = VersionState.UNLOADING
        if sv.batcher is not None:
            await sv.batcher.close()
        await self._backend.unload(sv.name, sv.version)
        del versions[version]

    async def unload_model(self, name: str) -> None:
        """Stop serving ``name``: requests already queued finish first."""
        if name not in self._models:
            if self._failed.pop(name, None) is not None:
                return  # it never loaded: forget that it failed
            raise ModelNotFound(f"model {name} is not loaded")
        async with self._locks.setdefault(name, asyncio.Lock()):
            versions = self._models.get(name, {})
            for version in list(versions):
                await self._unload_version(versions, version)
            self._models.pop(name, None)

    def served(self) -> list[ServedVersion]:
        """Every served version of every model, in any state."""
        return [sv for versions in self._models.values() for sv in versions.values()]

    def serves(self, name: str) -> bool:
        """True when ``name`` is a model this gateway serves (in any state)."""
        return bool(self._models.get(name))

    def versions(self, name: str) -> dict[int, ServedVersion]:
        """Every served version of ``name`` (404 when the model is not served)."""
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"unknown model {name!r}")
        return versions

    def get(self, name: str, version: str | None) -> ServedVersion:
        """The served version named by the URL, in any state.

        None names the latest: the newest READY version, so that a version still
        loading, unloading or failed never takes unversioned requests; the newest
        version when none is READY.
        """
        versions = self.versions(name)
        if version is None:
            ready = [v for v, sv in versions.items() if sv.state is VersionState.READY]
            return versions[max(ready or versions)]
        try:
            number = int(version)
        except ValueError:
            raise ModelNotFound(f"unknown version {version!r} of model {name}") from None
        sv = versions.get(number)
        if sv is None:
            raise ModelNotFound(f"unknown version {version!r} of model {name}")
        return sv

    def resolve(self, name: str, version: str | None) -> tuple[ServedVersion, DynamicBatcher]:
        """The READY version a request goes to, and its batcher."""
        sv = self.get(name, version)
        return sv, sv.ready_batcher()

    def index(self) -> list[dict[str, Any]]:
        """The V2 repository index: every model in the store, with the state of served ones."""
        rows: list[dict[str, Any]] = []
        names = sorted(set(self._store.models()) | set(self._models))
        for name in names:
            served = self._models.get(name, {})
            store_versions = set(self._store.versions(name)) if name in names else set()
            for version in sorted(store_versions | set(served)):
                sv = served.get(version)
                row: dict[str, Any] = {
                    "name": name,
                    "version": str(version),
                    "state": sv.state.value if sv else "UNAVAILABLE",
                }
                if sv is None:
                    row["reason"] = "not loaded"
                elif sv.reason:
                    row["reason"] = sv.reason
                rows.append(row)
        return rows
