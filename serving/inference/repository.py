"""The served model versions: which exist, their state, their batcher; load and unload."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from prometheus_client.metrics_core import Metric

from model_store.manifest import ModelManifest
from model_store.store import ModelStore, StoreError
from serving.config import FermionConfig, RemoteSettings
from serving.errors import FermionError, ModelNotFound, ModelNotReady
from serving.inference.backends import Backend, create_backend
from serving.inference.batcher import BatchRunner, DynamicBatcher
from serving.inference.placement import REMOTE, PlacedBatcher, location_family
from serving.observability.counters import VersionCounter, VersionCounters

if TYPE_CHECKING:
    from serving.inference.backends.remote import RemoteBackend

__all__ = [
    "ModelRepository",
    "NotReady",
    "Readiness",
    "ServedVersion",
    "VersionBatcher",
    "VersionState",
]

log = logging.getLogger("fermion.repository")

#: What a served version's requests are submitted to.
VersionBatcher = DynamicBatcher | PlacedBatcher


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

    def draining(self) -> Readiness:
        """Not ready: the gateway is draining before it stops (and whatever else is wrong)."""
        drain = NotReady("", None, "DRAINING", "the gateway is shutting down")
        return Readiness(False, (drain, *self.problems))


@dataclass
class ServedVersion:
    """One model version as the gateway serves it."""

    manifest: ModelManifest
    #: Every count of this version (kept across reloads, shared with its batcher).
    counter: VersionCounter
    state: VersionState = VersionState.LOADING
    reason: str = ""
    #: A PlacedBatcher when a local replica and upstreams both compute it.
    batcher: VersionBatcher | None = None
    replica: dict[str, Any] = field(default_factory=dict)
    #: Where its answers are computed: local, ray or remote; with a PlacedBatcher, which
    #: says where per answer, its policy (local-first, remote-first, split).
    location: str = "local"

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    def ready_batcher(self) -> VersionBatcher:
        """The batcher of this version when it is READY; ModelNotReady (503) otherwise."""
        if self.state is not VersionState.READY or self.batcher is None:
            detail = f": {self.reason}" if self.reason else ""
            raise ModelNotReady(
                f"model {self.name} version {self.version} is {self.state.value.lower()}{detail}"
            )
        return self.batcher


class ModelRepository:
    """Keeps the served versions of every model and their batchers, over its backends.

    ``backend`` hosts the versions (backend local, ray or remote); versions with
    upstreams of their own (``models.<name>.remote``) also use a remote backend,
    ``remote`` or one the repository starts and stops itself.
    """

    def __init__(
        self,
        config: FermionConfig,
        store: ModelStore,
        backend: Backend,
        *,
        counters: VersionCounters | None = None,
        remote: Backend | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        #: Called after each model load or unload, once the versions are in place, between
        #: ``start`` and ``stop`` (the caller settles the start-up loads once, after them).
        self._on_change = on_change
        self._store = store
        self._backend = backend
        self._own_remote = False
        if config.backend == REMOTE:
            remote = backend
        elif remote is None and config.uses_remote():
            remote, self._own_remote = create_backend(config, store, name=REMOTE), True
        self._remote = cast("RemoteBackend | None", remote)
        #: Every served version's counter (requests, batches), for metrics and canaries.
        self.counters = counters if counters is not None else VersionCounters()
        self._models: dict[str, dict[int, ServedVersion]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: Models that could not be loaded at all (e.g. not in the store) -> why.
        self._failed: dict[str, str] = {}
        self._started = False
        self._stopping = False

    @property
    def store(self) -> ModelStore:
        return self._store

    def configured_models(self) -> list[str]:
        """Models served at start: the config's, or every model in the store."""
        return sorted(self._config.models) if self._config.models else self._store.models()

    async def start(self) -> None:
        """Load every configured model; a model that fails stays UNAVAILABLE with its reason."""
        if self._own_remote and self._remote is not None:
            await self._remote.start()
        for name in self.configured_models():
            try:
                await self.load_model(name)
            except Exception as e:  # one broken model must not keep the others down
                log.error("model %s failed to load: %s", name, e)
                self._failed[name] = e.message if isinstance(e, FermionError) else str(e)
        self._started = True

    async def stop(self) -> None:
        """Drain and unload everything."""
        self._stopping = True
        for name in list(self._models):
            await self.unload_model(name)
        if self._own_remote and self._remote is not None:
            await self._remote.stop()

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

    def _served_versions(self, name: str) -> list[int]:
        try:
            return self.versions_to_serve(name)
        except StoreError:
            raise ModelNotFound(f"no model {name[:128]!r} in the store") from None

    def versions_to_serve(self, name: str) -> list[int]:
        """The versions of ``name`` this gateway serves: its version policy over the store
        and the versions only upstreams compute (a model not in the store: 1 by default)."""
        stored = self._store.versions(name)
        policy = self._config.models[name].versions if name in self._config.models else "all"
        available = sorted(set(stored) | set(self._config.upstream_versions(name)))
        if not available and self._upstream_only(name, 1):
            available = [1]
        if isinstance(policy, list):
            missing = sorted(
                v for v in set(policy) - set(available) if not self._upstream_only(name, v)
            )
            if missing:
                raise ModelNotFound(f"model {name} has no version(s) {missing} in the store")
            return sorted(policy)
        if not available:
            raise ModelNotFound(f"model {name} has no published version in the store")
        return available if policy == "all" else available[-1:]

    def _upstream_only(self, name: str, version: int) -> bool:
        settings = self._config.remote_for(name, version)
        return settings is not None and settings.policy == REMOTE

    async def _manifest(self, name: str, version: int) -> ModelManifest:
        """The store's manifest, or for a version only upstreams compute, the upstream's."""
        stored = version in self._store.versions(name)
        if self._remote is not None and not stored and self._upstream_only(name, version):
            return await self._remote.discover(name, version)
        return self._store.manifest(name, version)

    def _public(self, message: str) -> str:
        """``message`` as a client may read it: the store's place on disk left out."""
        return message.replace(str(self._store.root), "<store>")

    async def load_model(self, name: str) -> list[ServedVersion]:
        """(Re)load ``name`` from the store; versions no longer wanted are drained and unloaded."""
        # Checked before anything is kept for the name: unknown names cost nothing.
        self._served_versions(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            wanted = self._served_versions(name)
            current = self._models.get(name, {})
            ready = {
                v: sv for v, sv in current.items() if v in wanted and sv.state is VersionState.READY
            }
            try:
                manifests = [await self._manifest(name, v) for v in wanted if v not in ready]
            except StoreError as e:
                raise ModelNotFound(self._public(str(e))) from e
            self._failed.pop(name, None)
            current = self._models.setdefault(name, {})
            loaded: list[ServedVersion] = []
            fresh = {m.version: m for m in manifests}
            for version in wanted:
                existing = ready.get(version)
                if existing is not None:
                    loaded.append(existing)
                    continue
                manifest = fresh[version]
                sv = ServedVersion(manifest, self.counters.version(name, manifest.version))
                current[manifest.version] = sv
                await self._load_version(sv)
                loaded.append(sv)
            for version in sorted(set(current) - set(wanted)):
                await self._unload_version(current, version)
        self._changed()
        return loaded

    def _changed(self) -> None:
        if self._on_change is not None and self._started and not self._stopping:
            self._on_change()

    async def _load_version(self, sv: ServedVersion) -> None:
        settings = self._config.remote_for(sv.name, sv.version)
        try:
            if settings is None:
                sv.replica = await self._backend.load(sv.manifest)
                sv.batcher = self._batcher(sv, self._backend.infer_batch)
                sv.location = self._config.backend
            else:
                await self._load_placed(sv, settings)
        except Exception as e:
            sv.state = VersionState.UNAVAILABLE
            sv.reason = self._public(str(e))
            log.error("model %s version %s unavailable: %s", sv.name, sv.version, e)
            return
        sv.state = VersionState.READY
        sv.reason = ""
        log.info("model %s version %s ready (%s)", sv.name, sv.version, sv.replica.get("target"))

    async def _load_placed(self, sv: ServedVersion, settings: RemoteSettings) -> None:
        """Load a version its upstreams compute, alone or beside a local replica."""
        remote = self._remote
        assert remote is not None  # the config names upstreams, so the repository has one
        name, version = sv.name, sv.version
        remote_max = remote.batch_limit(sv.manifest)
        concurrent = remote.concurrent_batches(name, version)
        if settings.policy == REMOTE:
            sv.replica = await remote.load(sv.manifest)
            sv.batcher = self._batcher(sv, remote.infer_batch, remote_max, concurrent)
            sv.location = REMOTE
            return
        local: DynamicBatcher | None = None
        try:
            local_replica = await self._backend.load(sv.manifest)
            local = self._batcher(sv, self._backend.infer_batch)
        except Exception as e:  # the upstreams answer meanwhile
            log.error(
                "model %s version %s: no local replica (%s); upstreams only", name, version, e
            )
            local_replica = {"error": str(e)}
        try:
            remote_replica = await remote.load(sv.manifest, wait_ready=False)
        except Exception:
            if local is not None:
                await self._backend.unload(name, version)
            raise
        sv.replica = {
            "target": local_replica.get("target", REMOTE),
            "policy": settings.policy,
            self._config.backend: local_replica,
            REMOTE: remote_replica,
        }
        sv.batcher = PlacedBatcher(
            local,
            self._batcher(sv, remote.infer_batch, remote_max, concurrent),
            settings,
            local_location=self._config.backend,
            remote_up=functools.partial(remote.up, name, version),
        )
        sv.location = settings.policy

    def _batcher(
        self,
        sv: ServedVersion,
        infer_batch: Callable[[str, int, dict[str, np.ndarray]], Awaitable[dict[str, np.ndarray]]],
        max_rows: int | None = None,
        concurrent: int | None = None,
    ) -> DynamicBatcher:
        """A batcher of ``sv`` calling ``infer_batch``; ``max_rows`` replaces the batch size."""
        b = self._config.batching_for(sv.name)
        batched = sv.manifest.max_batch_size > 0
        rows = b.max_batch_size if max_rows is None else max_rows
        max_batch = min(rows, sv.manifest.max_batch_size) if batched else 1
        runner: BatchRunner = functools.partial(infer_batch, sv.name, sv.version)
        own = infer_batch == self._backend.infer_batch  # else the upstreams compute it
        return DynamicBatcher(
            # The batcher calls the backend itself: no frame of this module in between.
            runner,
            max_batch_size=max_batch,
            max_queue_delay_s=b.max_queue_delay_ms / 1000.0,
            max_queue_size=b.max_queue_size,
            max_concurrent_batches=concurrent or b.max_concurrent_batches,
            batched=batched,
            priority_levels=b.priority_levels,
            default_priority_level=b.default_priority_level,
            model=sv.name,
            version=str(sv.version),
            stats=sv.counter,
            run_inline=self._backend.inline_runner(sv.name, sv.version) if own else None,
            run_threaded=self._backend.threaded_runner(sv.name, sv.version) if own else None,
        )

    async def _unload_version(self, versions: dict[int, ServedVersion], version: int) -> None:
        sv = versions[version]
        sv.state = VersionState.UNLOADING
        if sv.batcher is not None:
            await sv.batcher.close()
        settings = self._config.remote_for(sv.name, sv.version)
        if settings is None or settings.policy != REMOTE:
            await self._backend.unload(sv.name, sv.version)
        if settings is not None and self._remote is not None:
            await self._remote.unload(sv.name, sv.version)
        del versions[version]

    async def unload_model(self, name: str) -> None:
        """Stop serving ``name``: requests already queued finish first."""
        if name not in self._models:
            if self._failed.pop(name, None) is not None:
                return  # it never loaded: forget that it failed
            raise ModelNotFound(f"model {name[:128]!r} is not loaded")
        async with self._locks.setdefault(name, asyncio.Lock()):
            versions = self._models.get(name, {})
            for version in list(versions):
                await self._unload_version(versions, version)
            self._models.pop(name, None)
        self._changed()

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

    def resolve(self, name: str, version: str | None) -> tuple[ServedVersion, VersionBatcher]:
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

    def collect(self) -> Iterator[Metric]:
        """Answers by location per version, and the upstream families of remote versions."""
        rows = []
        for sv in self.served():
            if isinstance(sv.batcher, PlacedBatcher):
                rows += [(sv.name, sv.version, where, n) for where, n in sv.batcher.answers.items()]
            elif sv.counter.ok:
                rows.append((sv.name, sv.version, sv.location, sv.counter.ok))
        yield location_family(sorted(rows))
        if self._remote is not None:
            yield from self._remote.collect()
