"""Backend ``remote``: a model version computed by upstream V2 servers.

The gateway keeps routing, auth, limits, tracing and dynamic batching; each batch
goes as one V2 request (binary tensors) to an upstream: another Fermion, Triton,
KServe or MLServer. A version's upstreams are a pool (see upstream/pool.py): the
batch goes to a healthy one, and a batch that got no answer there is sent once to
another while its deadline allows. A version not in the local store takes its
signature from the upstream's metadata; one that is, is checked against it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from model_store.manifest import ModelManifest
from model_store.store import ModelStore
from serving.config import FermionConfig, RemoteSettings
from serving.errors import DeadlineExceeded, FermionError, ModelNotReady
from serving.inference.backends import Backend
from serving.inference.batcher import batch_deadline_ns
from serving.inference.limits import TIMEOUT_HEADER
from serving.inference.upstream.client import UpstreamUnavailable, create_client
from serving.inference.upstream.pool import Upstream, UpstreamPool
from serving.inference.upstream.wire import (
    UpstreamFailed,
    check_metadata,
    signature_from_metadata,
)
from serving.observability import tracing

__all__ = ["RemoteBackend"]

log = logging.getLogger("fermion.backends.remote")

#: How often a load polls while it waits for an upstream.
_POLL_S = 0.25


@dataclass
class _RemoteVersion:
    """One served version and the upstream model version that computes it."""

    manifest: ModelManifest
    settings: RemoteSettings
    #: The model's name and version upstream ("": the unversioned path).
    model: str
    version: str
    pool: UpstreamPool = field(init=False)

    async def probe(self, upstream: Upstream, back: bool) -> str | None:
        """None when ``upstream`` can compute this version, else why not."""
        client, timeout = upstream.client, self.settings.health.timeout_s
        if not await client.server_ready(timeout):
            return "server not ready (/v2/health/ready)"
        if not await client.model_ready(self.model, self.version, timeout):
            return f"model {self.model} version {self.version or '(default)'} not ready upstream"
        if back:
            metadata = await client.model_metadata(self.model, self.version, timeout)
            problems = check_metadata(self.manifest, metadata)
            if problems:
                return "metadata differs from this version's: " + "; ".join(problems)
        return None


class RemoteBackend(Backend):
    """Versions computed by pools of upstream V2 servers, one pool per version."""

    def __init__(self, config: FermionConfig, store: ModelStore) -> None:
        self._config = config
        self._versions: dict[tuple[str, int], _RemoteVersion] = {}

    def _settings(self, name: str, version: int) -> RemoteSettings:
        settings = self._config.remote_for(name, version)
        if settings is None:
            raise ModelNotReady(f"model {name} has no upstream configured (models.{name}.remote)")
        return settings

    @staticmethod
    def _target(name: str, version: int, settings: RemoteSettings) -> tuple[str, str]:
        model = settings.model if settings.model is not None else name
        return model, str(version) if settings.version is None else settings.version

    async def start(self) -> None:
        """Nothing to acquire: each version opens its own connections."""

    async def stop(self) -> None:
        for name, version in list(self._versions):
            await self.unload(name, version)

    # -- versions ------------------------------------------------------------------------

    async def discover(self, name: str, version: int) -> ModelManifest:
        """The manifest of a version not in the local store, from an upstream's metadata.

        Waits up to ``load_timeout_s`` for an upstream to answer.
        """
        settings = self._settings(name, version)
        model, upstream_version = self._target(name, version, settings)
        deadline = time.monotonic() + settings.load_timeout_s
        timeout = settings.health.timeout_s
        while True:
            problems: list[str] = []
            for url in settings.urls:
                client = create_client(url, settings)
                try:
                    metadata = await client.model_metadata(model, upstream_version, timeout)
                    config = (
                        await client.model_config(model, upstream_version, timeout)
                        if settings.max_batch_size is None
                        else None
                    )
                    return _manifest(name, version, metadata, config, settings, model)
                except FermionError as e:
                    problems.append(f"{url}: {e.message}")
                finally:
                    await client.close()
            if time.monotonic() >= deadline:
                raise ModelNotReady(
                    f"no upstream gave the metadata of model {model} version "
                    f"{upstream_version or '(default)'} within {settings.load_timeout_s:g}s: "
                    + "; ".join(problems)
                )
            await asyncio.sleep(_POLL_S)

    async def load(self, manifest: ModelManifest, *, wait_ready: bool = True) -> dict[str, Any]:
        """Watch this version's upstreams; with ``wait_ready``, return once one is ready.

        Without it (a version whose local replica answers meanwhile), the version's
        upstreams join as their health checks pass.
        """
        name, version = manifest.name, manifest.version
        settings = self._settings(name, version)
        model, upstream_version = self._target(name, version, settings)
        upstreams = [Upstream(url, create_client(url, settings)) for url in settings.urls]
        remote = _RemoteVersion(manifest, settings, model, upstream_version)
        remote.pool = pool = UpstreamPool(
            upstreams, settings.health, remote.probe, f"{name} v{version}"
        )
        deadline = time.monotonic() + settings.load_timeout_s
        await pool.check()
        while wait_ready and not pool.up:
            if time.monotonic() >= deadline:
                await pool.stop()
                reasons = "; ".join(f"{u.url}: {u.reason}" for u in upstreams)
                raise ModelNotReady(
                    f"no upstream of model {name} version {version} ready within "
                    f"{settings.load_timeout_s:g}s: {reasons}"
                )
            await asyncio.sleep(_POLL_S)
            await pool.check()
        pool.start()
        old = self._versions.pop((name, version), None)
        self._versions[(name, version)] = remote
        if old is not None:
            await old.pool.stop()
        return {
            "backend": "remote",
            "target": "remote",
            "upstreams": [
                {"url": u.url, "ready": u.healthy, "reason": u.reason} for u in upstreams
            ],
            "model": model,
            "version": upstream_version,
            "max_batch_size": self.batch_limit(manifest) or manifest.max_batch_size,
        }

    def batch_limit(self, manifest: ModelManifest) -> int | None:
        """Rows per upstream request when ``max_batch_size`` is configured, else None."""
        limit = self._settings(manifest.name, manifest.version).max_batch_size
        return None if limit is None else max(1, min(limit, manifest.max_batch_size))

    def concurrent_batches(self, name: str, version: int) -> int:
        """Batches this version may have in flight to its upstreams."""
        settings = self._settings(name, version)
        return settings.max_concurrent_batches or 2 * len(settings.urls)

    def up(self, name: str, version: int) -> bool:
        """True when some upstream of this version would take a batch now."""
        remote = self._versions.get((name, version))
        return remote is not None and remote.pool.up

    async def unload(self, name: str, version: int) -> None:
        remote = self._versions.pop((name, version), None)
        if remote is not None:
            await remote.pool.stop()

    # -- the hot path --------------------------------------------------------------------

    async def infer_batch(
        self, name: str, version: int, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        remote = self._versions.get((name, version))
        if remote is None:
            raise ModelNotReady(f"model {name} version {version} has no upstream")
        pool, settings = remote.pool, remote.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.timeout_s
        requested = batch_deadline_ns.get()
        if requested is not None:
            deadline = min(deadline, loop.time() + (requested - time.perf_counter_ns()) / 1e9)
        headers = tracing.inject_context()
        tried: list[Upstream] = []
        last = ""
        while len(tried) < 2:  # one upstream, and once more on another
            upstream = pool.pick(exclude=tried)
            remaining = deadline - loop.time()
            if upstream is None or remaining <= 0:
                break
            tried.append(upstream)
            if requested is not None:
                headers[TIMEOUT_HEADER] = str(max(1, int(remaining * 1000)))
            upstream.in_flight += 1
            started = time.perf_counter()
            try:
                outputs = await upstream.client.infer(
                    remote.model,
                    remote.version,
                    remote.manifest,
                    inputs,
                    timeout_s=remaining,
                    headers=headers,
                )
            except UpstreamUnavailable as e:
                pool.no_answer(upstream, e.message)
                last = e.message
                log.warning("upstream %s of %s v%s: %s", upstream.url, name, version, e.message)
                continue
            except FermionError:
                pool.answered(upstream, time.perf_counter() - started, ok=False)
                raise
            finally:
                upstream.in_flight -= 1
            pool.answered(upstream, time.perf_counter() - started, ok=True)
            return outputs
        if requested is not None and time.perf_counter_ns() >= requested:
            raise DeadlineExceeded(
                f"deadline passed while the upstreams of model {name} version {version} computed"
            )
        if not tried:
            raise UpstreamUnavailable(f"no upstream of model {name} version {version} is up")
        raise UpstreamUnavailable(
            f"no answer from {len(tried)} upstream(s) of model {name} version {version}: {last}"
        )

    # -- metrics -------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Upstream latency, outcomes, health and ejections, per version and upstream."""
        labels = ["model", "version", "upstream"]
        latency = HistogramMetricFamily(
            "fermion_upstream_request_duration_seconds",
            "Time from sending a batch to an upstream to its answer.",
            labels=labels,
        )
        outcomes = CounterMetricFamily(
            "fermion_upstream_requests",
            "Batches sent to upstreams, by outcome (ok, error answer, unavailable: no answer).",
            labels=[*labels, "outcome"],
        )
        up = GaugeMetricFamily(
            "fermion_upstream_up",
            "1 when the upstream gets traffic (healthy, circuit closed).",
            labels=labels,
        )
        ejections = CounterMetricFamily(
            "fermion_upstream_ejections",
            "Times an upstream was taken out of traffic (failed check, circuit opened).",
            labels=labels,
        )
        for (name, version), remote in sorted(self._versions.items()):
            for u in remote.pool.upstreams:
                values = [name, str(version), u.url]
                latency.add_metric(values, u.latency.buckets(), u.latency.total)
                for outcome, count in sorted(u.outcomes.items()):
                    outcomes.add_metric([*values, outcome], count)
                up.add_metric(values, 1 if u.up else 0)
                ejections.add_metric(values, u.ejections)
        yield from (latency, outcomes, up, ejections)


def _manifest(
    name: str,
    version: int,
    metadata: Any,
    config: Any,
    settings: RemoteSettings,
    model: str,
) -> ModelManifest:
    """A manifest (with no artifact) for a version known only from upstream."""
    platform, inputs, outputs = signature_from_metadata(metadata)
    max_batch = settings.max_batch_size
    if max_batch is None:
        found = config.get("max_batch_size") if isinstance(config, dict) else None
        max_batch = found if type(found) is int and found > 0 else 0
    if max_batch > 0:
        fixed = [t.name for t in (*inputs, *outputs) if not t.shape or t.shape[0] != -1]
        if fixed:
            raise UpstreamFailed(
                f"max_batch_size is {max_batch} but {', '.join(map(repr, fixed))} has no "
                "dynamic first dim upstream"
            )
    return ModelManifest(
        name=name,
        version=version,
        platform=platform or "remote",
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch,
        metadata={"upstream": {"model": model, "urls": settings.urls}},
    )
