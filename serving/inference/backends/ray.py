"""Backend ``ray``: every served model version is an autoscaling Ray Serve deployment.

All of Fermion's Ray calls live in this module. The gateway keeps HTTP, the V2
codec and batching; a whole batch crosses to a replica in one round trip, over
the replica's channel (``backends.channel``) or through a ``DeploymentHandle``.
Ray is imported only when this backend starts, after the environment it reads at
import time is set.

Several gateways may join one cluster with one namespace (a fleet of gateway pods
behind a load balancer): they share each version's application. Who uses which
application is kept by one detached actor per namespace (:class:`AppLeases`), and
the last gateway to unload a version deletes it, so a gateway that stops (a
rolling update) never takes a deployment away from the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from model_store.manifest import ModelManifest
from model_store.store import ModelStore
from serving.config import FermionConfig, RayDeploymentConfig, TracingConfig
from serving.errors import DeadlineExceeded, InferenceFailed, ModelNotReady, Overloaded
from serving.inference.backends import Backend
from serving.inference.backends.channel import (
    ChannelError,
    ChannelGone,
    ChannelServer,
    ChannelUnreachable,
    FrameError,
    ReplicaChannel,
)
from serving.inference.backends.ray_policy import CHANNEL_BATCHES, channel_aware_policy
from serving.inference.batcher import batch_deadline_ns
from serving.inference.executors import ExecutorOptions
from serving.inference.replica import ModelReplica, needs_gpu, preference_order
from serving.observability import tracing

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle
    from ray.serve.schema import ServeStatus

__all__ = ["AppLeases", "RayBackend", "ReplicaDeployment"]

log = logging.getLogger("fermion.backends.ray")

#: Below this much time left before the deadline, a batch is not retried.
_MIN_RETRY_S = 0.05
#: How often a load polls Ray Serve for the state of its deployment.
_POLL_S = 0.2
#: How often the running replicas of every deployment are counted (for /metrics).
_REPLICA_COUNT_S = 5.0
#: How often the gateway reads which replicas offer a channel (see ``channel``).
_CHANNEL_REFRESH_S = 1.0
#: A stopping replica waits this long at most for the gateways to stop sending it batches
#: over its channel, once they all got the answers of those it was computing (a little over
#: ``_CHANNEL_REFRESH_S``, when an idle gateway reads that its offer was withdrawn).
_DRAIN_QUIET_S = 2.0
#: ... and this long at most for those answers (within Serve's graceful shutdown timeout).
_DRAIN_TIMEOUT_S = 6.0
#: The detached actor of a namespace that keeps its leases and replicas' channels.
_LEASES_ACTOR = "fermion-app-leases"
#: Held while Serve builds a deployment's configuration, and while it parses one
#: (``_serve_status``). Serve pickles its request router and autoscaling policy "by
#: value" between a process-wide register and unregister of their module
#: (``ray.cloudpickle``), and does so again for each request router config it parses
#: from the controller's answer to ``serve.status()``. So two threads doing either at
#: once can unregister each other's module: a load then fails with "... is not
#: registered for pickle by value" (Ray 2.60). Reentrant: ``_deploy`` holds it across
#: ``_bind_replica`` and ``serve.run_many``.
_SERVE_CONFIG_LOCK = threading.RLock()
#: The replica's side of Ray Serve's throughput-optimized data path (see ``_fast_handle``):
#: a batch runs on the replica's own event loop, not behind a hop to a user-code thread
#: and another to a thread pool (each replica computes one batch at a time, on the CPUs
#: it reserves: scale replicas for more), and its gRPC server takes a batch of any size
#: (gRPC's own limit is 4 MB).
_REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_SYNC_IN_THREADPOOL": "0",
    # Read by both ends: the replica's server and the gateway's channel to it.
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1),
}


class ReplicaDeployment:
    """What runs inside one Ray Serve replica: one model version, loaded and warmed up.

    The constructor returns (and Serve reports the replica healthy) only after the
    artifact was verified, loaded and a warm-up batch ran. With ``channel_json``
    (``{"namespace": ..., "app": ...}``) the replica also listens on a channel of
    Fermion's own (``backends.channel``) on its node's address, and offers it to the
    gateways through the namespace's :class:`AppLeases` actor, with a token only
    the cluster's members can read there. A replica computes one batch at a time,
    whichever path it came by.
    """

    def __init__(
        self,
        store_root: str,
        manifest_json: str,
        prefer: list[str],
        intra_op_threads: int,
        tracing_json: str | None = None,
        channel_json: str | None = None,
    ) -> None:
        manifest = ModelManifest.model_validate_json(manifest_json)
        options = ExecutorOptions(intra_op_threads=intra_op_threads)
        if tracing_json is not None and tracing.current_tracer() is None:
            # The replica's process exports its own spans, as the gateway's are configured.
            tracing.configure(TracingConfig.model_validate_json(tracing_json))
        self._attributes: dict[str, str | int] = {
            "fermion.model": manifest.name,
            "fermion.version": str(manifest.version),
        }
        self._replica = ModelReplica(
            ModelStore(store_root), manifest, prefer=prefer, options=options
        )
        self._lock = threading.Lock()
        self._channel: ChannelServer | None = None
        self._offer: tuple[Any, str, str] | None = None
        #: Whether the gateway that deployed it sends batches over channels.
        self._deployed_with_channel = channel_json is not None
        if channel_json is not None:
            self._open_channel(json.loads(channel_json))

    def _open_channel(self, where: dict[str, str]) -> None:
        import ray
        from ray import serve

        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # not in a Serve replica (a plain actor): any unique name
            replica = uuid.uuid4().hex
        token = secrets.token_urlsafe(32)
        try:
            host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
            server = ChannelServer(self.infer, host=host, token=token)
            leases = ray.get_actor(_LEASES_ACTOR, namespace=where["namespace"])
        except Exception as e:  # the gateways keep Serve's handle for this replica
            log.warning("ray: replica %s offers no channel: %s", replica, e)
            return
        server.start()
        self._channel = server
        # Not waited for: the actor runs its calls in order, before any gateway's read.
        leases.offer_channel.remote(where["app"], replica, server.address, token)
        self._offer = (leases, where["app"], replica)

    def __del__(self) -> None:
        """Serve's graceful shutdown (a downscale, a redeploy): drain the channel.

        Serve waits for the requests its handles sent before it calls this; the
        channel's batches are waited for here. The offer is withdrawn, a batch that
        comes meanwhile is sent back uncomputed to go to another replica, and the
        channel closes once the batches in progress are answered and the gateways let
        go (see ``ChannelServer.drain``).
        """
        channel, self._channel = getattr(self, "_channel", None), None
        offer, self._offer = getattr(self, "_offer", None), None
        if offer is not None:
            leases, app, replica = offer
            with contextlib.suppress(Exception):
                leases.withdraw_channel.remote(app, replica)
        if channel is not None:
            if not channel.drain(quiet_s=_DRAIN_QUIET_S, timeout_s=_DRAIN_TIMEOUT_S):
                log.warning("ray: replica stops with channel batches still in progress")
            channel.close()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Called by Serve for an autoscaling deployment: the batches the channel carried,
        which Serve's handles did not count (see ``ray_policy``)."""
        channel = self._channel
        return {CHANNEL_BATCHES: channel.load() if channel is not None else 0.0}

    def infer(
        self, inputs: dict[str, np.ndarray], carrier: dict[str, str] | None = None
    ) -> dict[str, np.ndarray]:
        """Compute one batch; ``carrier`` holds the gateway's trace context (W3C headers)."""
        with self._lock:
            tracer = tracing.current_tracer()
            if tracer is None or not carrier:
                return self._replica.run(inputs)
            parent = tracing.extract_context(carrier)
            with tracer.start_as_current_span(
                "fermion.replica.execute", context=parent, attributes=self._attributes
            ) as span:
                span.set_attribute("fermion.batch.rows", _rows(inputs))
                return self._replica.run(inputs)

    def describe(self) -> dict[str, Any]:
        """The artifact this replica chose, its load and warm-up times, and ``channel``:
        whether it was deployed to offer a channel."""
        return {**self._replica.describe(), "channel": self._deployed_with_channel}


def _bind_replica(options: dict[str, Any], *args: Any) -> Any:
    """A ``ReplicaDeployment`` with Serve ``options`` and its constructor's ``args``, as
    an application to run; safe from several threads at once."""
    from ray import serve

    with _SERVE_CONFIG_LOCK:
        return serve.deployment(**options)(ReplicaDeployment).bind(*args)


def _serve_status() -> ServeStatus:
    """``serve.status()``, which parses every deployment's configuration: under
    ``_SERVE_CONFIG_LOCK``, so that a version building its deployment in another thread
    does not lose its module's pickle-by-value registration to it."""
    from ray import serve

    with _SERVE_CONFIG_LOCK:
        return serve.status()


def _replica_tracing(config: TracingConfig) -> str | None:
    """The gateway's tracing, resolved from its file and environment, for its replicas."""
    resolved = tracing.resolve(config)
    return resolved.model_dump_json() if resolved.exporter != "none" else None


def _rows(inputs: dict[str, np.ndarray]) -> int:
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


class AppLeases:
    """Which gateways use each Serve application of a namespace (run as a detached actor).

    An actor runs its methods one at a time, so taking and giving back a lease are
    atomic across the gateways of the cluster. An application whose last lease was
    given back is marked as being deleted until its deleter says it is gone; a
    gateway that takes a lease on it meanwhile waits for it to go, then deploys it anew.

    It also keeps the channels the application's replicas offer (address and token,
    per replica), for the gateways to read.
    """

    def __init__(self) -> None:
        self._holders: dict[str, set[str]] = {}
        self._deleting: set[str] = set()
        self._channels: dict[str, dict[str, tuple[str, str]]] = {}

    def offer_channel(self, app: str, replica: str, address: str, token: str) -> None:
        """A replica of ``app`` listens at ``address`` for connections showing ``token``."""
        self._channels.setdefault(app, {})[replica] = (address, token)

    def withdraw_channel(self, app: str, replica: str) -> None:
        """The replica stopped (or a gateway found it gone)."""
        offered = self._channels.get(app)
        if offered is not None:
            offered.pop(replica, None)

    def channels(self, app: str) -> dict[str, tuple[str, str]]:
        """The channels the replicas of ``app`` offer, by replica."""
        return dict(self._channels.get(app, {}))

    def take(self, app: str, holder: str) -> bool:
        """Count ``holder`` as a user of ``app``; True when its last user is deleting it."""
        self._holders.setdefault(app, set()).add(holder)
        deleting = app in self._deleting
        self._deleting.discard(app)
        return deleting

    def give_back(self, app: str, holder: str) -> bool:
        """``holder`` stops using ``app``; True when it was the last user (it deletes the app)."""
        holders = self._holders.get(app)
        if holders is not None:
            holders.discard(holder)
            if holders:
                return False
            del self._holders[app]
        self._deleting.add(app)
        self._channels.pop(app, None)
        return True

    def deleted(self, app: str) -> None:
        """The application is gone (nothing to wait for, unless a new user deployed it)."""
        if app not in self._holders:
            self._deleting.discard(app)

    def holders(self, app: str) -> list[str]:
        """The gateways using ``app``."""
        return sorted(self._holders.get(app, ()))


class _ReplicaGone(Exception):
    """The replica computing a batch died or became unreachable."""


@dataclass
class _Deployment:
    app: str
    handle: DeploymentHandle[Any]
    #: The handle of the hot path, bound to ``infer``, made once (see ``_fast_handle``).
    infer: DeploymentHandle[Any]
    #: Whether its replicas' channels carry its batches (see ``RayBackend._call``).
    use_channel: bool = False
    #: Batches one replica takes at once over its channel (its ``max_ongoing_requests``).
    channel_limit: int = 1
    #: The open channels, by replica.
    channels: dict[str, ReplicaChannel] = field(default_factory=dict)
    #: Replicas whose channel failed, not to be reopened while still offered.
    dead: set[str] = field(default_factory=set)
    #: Where the next pick starts among equally loaded channels.
    turn: int = 0


def _fast_handle(deployment: str, app: str) -> DeploymentHandle[Any]:
    """A handle to ``infer`` over Ray Serve's throughput-optimized data path.

    Its router runs on the calling event loop (the gateway's), not on a thread of its
    own that every call and answer would cross, and a batch goes to the replica over
    Serve's direct gRPC channel, pickled (protocol 5), instead of as a Ray task through
    the object store. Side by side with the default handle (``bench/tail_bench.py --ray``,
    see the README) this took a one-sample request's p50 at c=1 from 5.2-5.5 ms to
    2.3-2.4 ms and req/s at c=64 up 1.4x. Made on the gateway's event loop (``load`` runs
    there), once per load: the router belongs to that loop.
    """
    from ray.serve.handle import DeploymentHandle

    handle: DeploymentHandle[Any] = DeploymentHandle(deployment, app)
    # Ray's own proxy initializes its handles the same way (ray.serve default_impl).
    handle._init(_run_router_in_separate_loop=False)  # type: ignore[no-untyped-call]
    return handle.options(
        method_name="infer",
        _by_reference=False,
        request_serialization="pickle",
        response_serialization="pickle",
    )


class RayBackend(Backend):
    """Replicas as Ray Serve deployments, one per model version, on a local or joined cluster."""

    def __init__(self, config: FermionConfig, store: ModelStore) -> None:
        self._config = config
        self._ray_config = config.ray
        self._store = store
        self._deployments: dict[tuple[str, int], _Deployment] = {}
        self._connecting: asyncio.Task[None] | None = None
        self._connected = False
        self._started_cluster = False
        self._gone_errors: tuple[type[BaseException], ...] = ()
        self._task_error: type[BaseException] = Exception
        #: This gateway, as a holder of application leases.
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._leases: Any = None
        self._replica_counts: dict[tuple[str, int], int] = {}
        self._counting: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None

    # -- cluster ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start (or join) the cluster in the background: ``ray.init`` blocks for seconds."""
        timeout = self._ray_config.start_timeout_s
        self._connecting = asyncio.create_task(
            asyncio.wait_for(asyncio.to_thread(self._connect), timeout)
        )
        self._counting = asyncio.create_task(
            self._while_connected(_REPLICA_COUNT_S, self._count_replicas_now)
        )
        self._refreshing = asyncio.create_task(
            self._while_connected(_CHANNEL_REFRESH_S, self._refresh_all_channels)
        )

    async def _while_connected(self, period_s: float, step: Callable[[], Awaitable[None]]) -> None:
        """Once the cluster is up, run ``step`` every ``period_s`` while connected."""
        if self._connecting is not None:
            with contextlib.suppress(Exception):  # the loads report a cluster that failed
                await asyncio.shield(self._connecting)
        while self._connected:
            await step()
            await asyncio.sleep(period_s)

    async def _count_replicas_now(self) -> None:
        """Count each deployment's RUNNING replicas, off the event loop."""
        try:
            self._replica_counts = await asyncio.to_thread(self._count_replicas)
        except Exception as e:  # a busy controller: keep the last counts
            log.debug("ray: cannot count replicas: %s", e)

    def _count_replicas(self) -> dict[tuple[str, int], int]:
        applications = _serve_status().applications
        counts: dict[tuple[str, int], int] = {}
        for key, deployment in list(self._deployments.items()):
            status = applications.get(deployment.app)
            if status is None:
                continue
            counts[key] = sum(
                n
                for d in status.deployments.values()
                for state, n in d.replica_states.items()
                if str(getattr(state, "value", state)) == "RUNNING"
            )
        return counts

    def replica_counts(self) -> dict[tuple[str, int], int]:
        """RUNNING replicas per deployment of this gateway, as counted a few seconds ago."""
        return {k: n for k, n in self._replica_counts.items() if k in self._deployments}

    def _connect(self) -> None:
        rc = self._ray_config
        if rc.address is None:
            # Read by Ray at import: bind the local cluster to loopback, not eth0.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Read by Serve at import: this gateway's channels take answers of any size.
        limit = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
        os.environ.setdefault(limit, _REPLICA_ENV[limit])
        import ray
        from ray import serve
        from ray.exceptions import RayActorError, RayTaskError

        self._gone_errors = (RayActorError,)
        self._task_error = RayTaskError
        started = time.perf_counter()
        common: dict[str, Any] = {
            "namespace": rc.namespace,
            "logging_level": logging.WARNING,
            "log_to_driver": False,
        }
        if rc.address is None:
            ray.init(
                address="local",
                num_cpus=rc.num_cpus,
                include_dashboard=rc.include_dashboard,
                dashboard_host="127.0.0.1",
                **common,
            )
            self._started_cluster = True
        else:
            ray.init(address=rc.address, **common)
        serve.start(proxy_location="Disabled")
        self._leases = (
            ray.remote(AppLeases)
            .options(
                name=_LEASES_ACTOR,
                namespace=rc.namespace,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
            )
            .remote()
        )
        self._connected = True
        where = "started a local cluster" if self._started_cluster else f"joined {rc.address}"
        log.info("ray: %s in %.1fs", where, time.perf_counter() - started)

    async def _wait_connected(self) -> None:
        if self._connecting is None:
            raise ModelNotReady("backend ray is not started")
        try:
            await asyncio.shield(self._connecting)
        except TimeoutError:
            raise ModelNotReady(
                f"the Ray cluster did not start within {self._ray_config.start_timeout_s}s"
            ) from None
        except Exception as e:
            raise ModelNotReady(f"cannot start or join the Ray cluster: {e}") from e

    async def stop(self) -> None:
        """Remove this gateway's deployments; stop the cluster only if this gateway started it."""
        if self._connecting is not None:
            try:
                await self._connecting
            except Exception as e:  # nothing to release if the cluster never came up
                log.warning("ray: cluster was not up: %s", e)
        for task in (self._counting, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for name, version in list(self._deployments):
            await self.unload(name, version)
        if self._connected:
            # On the loop's own thread: Ray's driver aborts at exit when shut down from
            # a worker thread. Traffic is over by now, so the short block is harmless.
            self._disconnect()

    def _disconnect(self) -> None:
        import ray

        # A cluster this gateway started goes with it; a joined one only loses this driver.
        ray.shutdown()
        self._connected = False

    # -- deployments -----------------------------------------------------------------------

    def _app_name(self, manifest: ModelManifest) -> str:
        return f"{self._ray_config.namespace}.{manifest.name}.{manifest.version}"

    async def load(self, manifest: ModelManifest) -> dict[str, Any]:
        await self._wait_connected()
        settings = self._config.ray_deployment_for(manifest.name)
        deadline = time.monotonic() + self._ray_config.load_timeout_s
        handle, info = await asyncio.to_thread(self._deploy, manifest, settings, deadline)
        key = (manifest.name, manifest.version)
        fast = _fast_handle(info["deployment"], info["application"])
        deployment = _Deployment(
            info["application"],
            handle,
            fast,
            use_channel=info["transport"] == "channel",
            channel_limit=info["max_ongoing_requests"],
        )
        self._deployments[key] = deployment
        if deployment.use_channel:
            with contextlib.suppress(Exception):  # Serve's handle serves until the next read
                await self._refresh_channels(deployment)
        return info

    def _deployment_options(
        self, manifest: ModelManifest, settings: RayDeploymentConfig
    ) -> dict[str, Any]:
        batching = self._config.batching_for(manifest.name)
        actor: dict[str, Any] = {
            "num_cpus": settings.num_cpus,
            "num_gpus": self._gpus_for(manifest, settings),
            "runtime_env": {"env_vars": dict(_REPLICA_ENV)},
        }
        if settings.memory_mb is not None:
            actor["memory"] = settings.memory_mb * 1024 * 1024
        a = settings.autoscaling
        options: dict[str, Any] = {
            "name": f"{manifest.name}-v{manifest.version}",
            "ray_actor_options": actor,
            "max_ongoing_requests": settings.max_ongoing_requests
            or batching.max_concurrent_batches + 1,
            "graceful_shutdown_wait_loop_s": 0.5,
            "health_check_period_s": settings.health_check_period_s,
            "graceful_shutdown_timeout_s": 10.0,
            "logging_config": {"enable_access_log": False, "log_level": "WARNING"},
        }
        initial = a.initial_replicas if a.initial_replicas is not None else max(1, a.min_replicas)
        if a.min_replicas == a.max_replicas == initial:
            options["num_replicas"] = a.max_replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": a.min_replicas,
                "max_replicas": a.max_replicas,
                "initial_replicas": initial,
                "target_ongoing_requests": a.target_ongoing_requests,
                "upscale_delay_s": a.upscale_delay_s,
                "downscale_delay_s": a.downscale_delay_s,
                "metrics_interval_s": a.metrics_interval_s,
                "look_back_period_s": a.look_back_period_s,
            }
            if self._ray_config.channel:
                # Serve's autoscaler counts what its handles route; the replicas report
                # the channels' batches and this policy adds them.
                options["autoscaling_config"]["policy"] = {"policy_function": channel_aware_policy}
        return options

    def _gpus_for(self, manifest: ModelManifest, settings: RayDeploymentConfig) -> float:
        if settings.num_gpus is not None:
            return settings.num_gpus
        ordered = preference_order(manifest, self._config.executor_for(manifest.name).prefer)
        if not ordered or not needs_gpu(ordered[0]):
            return 0.0
        import ray

        gpus = ray.cluster_resources().get("GPU", 0)  # type: ignore[no-untyped-call]
        return 1.0 if gpus > 0 else 0.0

    def _lease(self, method: str, deadline: float, *args: str) -> Any:
        """Call ``method`` of the namespace's :class:`AppLeases` actor and wait for it."""
        import ray

        call = getattr(self._leases, method).remote(*args)
        return ray.get(call, timeout=max(1.0, deadline - time.monotonic()))

    def _deploy(
        self, manifest: ModelManifest, settings: RayDeploymentConfig, deadline: float
    ) -> tuple[DeploymentHandle[Any], dict[str, Any]]:
        from ray import serve

        app = self._app_name(manifest)
        key = (manifest.name, manifest.version)
        options = self._deployment_options(manifest, settings)
        channel = self._ray_config.channel
        if self._lease("take", deadline, app, self._holder):
            # Its last user is deleting it: deploy anew once it is gone.
            self._wait_gone(app, deadline)
        current = _serve_status().applications.get(app)
        running = current is not None and current.status == "RUNNING"
        # Another gateway of this namespace deployed it: use it as it is.
        shared = running and key not in self._deployments
        if shared:
            handle = serve.get_app_handle(app)
        else:
            executor = self._config.executor_for(manifest.name)
            where = {"namespace": self._ray_config.namespace, "app": app}
            with _SERVE_CONFIG_LOCK:
                bound = _bind_replica(
                    options,
                    str(self._store.root.resolve()),
                    manifest.model_dump_json(),
                    list(executor.prefer),
                    executor.intra_op_threads,
                    _replica_tracing(self._config.tracing),
                    json.dumps(where) if channel else None,
                )
                # Not serve.run: it waits for RUNNING with no deadline; this load has one.
                target = serve.RunTarget(bound, name=app, route_prefix=None)
                handle = serve.run_many([target], wait_for_applications_running=False)[0]
            try:
                self._wait_running(app, deadline)
            except Exception:
                try:
                    last = self._lease("give_back", time.monotonic() + 10.0, app, self._holder)
                except Exception as e:  # keep the deployment error; never delete unsure
                    log.warning("ray: cannot give the lease on %s back: %s", app, e)
                    last = False
                if last:
                    serve.delete(app, _blocking=False)
                raise
        timeout = max(1.0, deadline - time.monotonic())
        described: dict[str, Any] = handle.describe.remote().result(timeout_s=timeout)
        # Deployed by another gateway: its replicas offer channels only if it chose them
        # (a replica of a Fermion before channels says nothing: none).
        deployed_with_channel = bool(described.pop("channel", False))
        if shared:
            channel = channel and deployed_with_channel
        replicas = options.get("autoscaling_config") or {
            "num_replicas": options.get("num_replicas")
        }
        if "policy" in replicas:
            replicas = {**replicas, "policy": "fermion channel-aware"}
        info: dict[str, Any] = {
            "backend": "ray",
            "application": app,
            "deployment": options["name"],
            "shared": shared,
            "replicas": replicas,
            "resources": options["ray_actor_options"],
            "max_ongoing_requests": options["max_ongoing_requests"],
            "transport": "channel" if channel else "serve handle",
            **described,
        }
        return handle, info

    def _wait_running(self, app: str, deadline: float) -> None:
        while True:
            status = _serve_status().applications.get(app)
            state = "" if status is None else str(getattr(status.status, "value", status.status))
            if state == "RUNNING":
                return
            detail = "" if status is None else _status_message(status)
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"deployment {app} failed: {detail}")
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"replicas of {app} not ready after {self._ray_config.load_timeout_s:.0f}s"
                    f" ({state or 'not created'}): {detail}"
                )
            time.sleep(_POLL_S)

    async def unload(self, name: str, version: int) -> None:
        deployment = self._deployments.pop((name, version), None)
        if deployment is None:
            return
        for channel in deployment.channels.values():
            channel.close()
        deployment.channels.clear()
        deadline = time.monotonic() + self._ray_config.load_timeout_s
        await asyncio.to_thread(self._release, deployment.app, deadline)

    def _release(self, app: str, deadline: float) -> None:
        """Give this gateway's lease back; the last user deletes the application."""
        from ray import serve

        if not self._lease("give_back", deadline, app, self._holder):
            log.info("ray: %s stays deployed for the other gateways using it", app)
            return
        serve.delete(app, _blocking=False)
        self._wait_gone(app, deadline)
        self._lease("deleted", deadline, app)

    def _wait_gone(self, app: str, deadline: float) -> None:
        while app in _serve_status().applications and time.monotonic() < deadline:
            time.sleep(_POLL_S)

    # -- channels ----------------------------------------------------------------------------

    async def _refresh_all_channels(self) -> None:
        """Follow which replicas of every deployment offer a channel."""
        for deployment in list(self._deployments.values()):
            if not deployment.use_channel:
                continue
            try:
                await self._refresh_channels(deployment)
            except Exception as e:  # a busy actor: keep the channels as they are
                log.debug("ray: cannot read the channels of %s: %s", deployment.app, e)

    async def _refresh_channels(self, deployment: _Deployment) -> None:
        offered: dict[str, tuple[str, str]] = await self._leases.channels.remote(deployment.app)
        for replica in list(deployment.channels):
            if replica not in offered:  # withdrawn: the replica stopped
                deployment.channels.pop(replica).close()
        deployment.dead &= offered.keys()
        for replica, (address, token) in offered.items():
            if replica in deployment.channels or replica in deployment.dead:
                continue
            channel = ReplicaChannel(replica, address, token, deployment.channel_limit)
            deployment.channels[replica] = channel
            log.info("ray: channel to replica %s of %s at %s", replica, deployment.app, address)

    def _pick_channel(self, deployment: _Deployment) -> ReplicaChannel | None:
        """The open channel with the fewest batches in flight, under its limit; None: none."""
        channels = list(deployment.channels.values())
        if not channels:
            return None
        deployment.turn += 1
        best: ReplicaChannel | None = None
        for i in range(len(channels)):
            channel = channels[(deployment.turn + i) % len(channels)]
            if channel.in_flight < channel.limit and (
                best is None or channel.in_flight < best.in_flight
            ):
                best = channel
        return best

    def _drop_channel(self, deployment: _Deployment, channel: ReplicaChannel, why: str) -> None:
        """Stop using a replica's channel that failed, and tell the other gateways."""
        if deployment.channels.get(channel.replica) is channel:
            del deployment.channels[channel.replica]
        deployment.dead.add(channel.replica)
        channel.close()
        log.info(
            "ray: channel to replica %s of %s dropped: %s", channel.replica, deployment.app, why
        )
        with contextlib.suppress(Exception):
            self._leases.withdraw_channel.remote(deployment.app, channel.replica)

    # -- the hot path ------------------------------------------------------------------------

    async def infer_batch(
        self, name: str, version: int, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        deployment = self._deployments.get((name, version))
        if deployment is None:
            raise ModelNotReady(f"model {name} version {version} has no deployment")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ray_config.request_timeout_s
        requested = batch_deadline_ns.get()
        if requested is not None:
            # Nobody waits for the batch past its requests' own deadline.
            deadline = min(deadline, loop.time() + (requested - time.perf_counter_ns()) / 1e9)
        try:
            return await self._call(deployment, name, version, inputs, deadline)
        except _ReplicaGone as e:
            if deadline - loop.time() < _MIN_RETRY_S:
                raise ModelNotReady(
                    f"a replica of model {name} version {version} died computing this batch "
                    f"and no time was left to retry ({e})"
                ) from None
            log.warning("ray: %s; retrying the batch once on another replica", e)
        try:
            return await self._call(deployment, name, version, inputs, deadline)
        except _ReplicaGone as e:
            raise ModelNotReady(
                f"replicas of model {name} version {version} died twice computing this batch "
                f"({e}); retry later"
            ) from None

    async def _call(
        self,
        deployment: _Deployment,
        name: str,
        version: int,
        inputs: dict[str, np.ndarray],
        deadline: float,
    ) -> dict[str, np.ndarray]:
        carrier = tracing.inject_context()
        while (channel := self._pick_channel(deployment)) is not None:
            try:
                async with asyncio.timeout_at(deadline):
                    return await channel.call(inputs, carrier)
            except TimeoutError:
                self._timed_out(name, version)
            except ChannelUnreachable as e:  # nothing was sent: try the next path now
                self._drop_channel(deployment, channel, str(e))
            except ChannelGone as e:
                self._drop_channel(deployment, channel, str(e))
                raise _ReplicaGone(f"replica unavailable: {e}") from None
            except ChannelError as e:
                raise InferenceFailed(
                    f"inference failed on a replica of model {name} version {version}: {e}"
                ) from None
            except FrameError as e:  # a tensor the channel cannot carry: Serve pickles it
                log.debug("ray: batch goes by Serve's handle: %s", e)
                break
        response = (
            deployment.infer.remote(inputs, carrier) if carrier else deployment.infer.remote(inputs)
        )
        try:
            async with asyncio.timeout_at(deadline):
                outputs: dict[str, np.ndarray] = await response
                return outputs
        except TimeoutError:
            response.cancel()  # type: ignore[no-untyped-call]
            self._timed_out(name, version)
        except self._gone_errors as e:
            raise _ReplicaGone(f"replica unavailable: {_first_line(e)}") from None
        except self._task_error as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, self._gone_errors):
                raise _ReplicaGone(f"replica unavailable: {_first_line(cause)}") from None
            raise InferenceFailed(
                f"inference failed on a replica of model {name} version {version}: "
                f"{_first_line(cause if cause is not None else e)}"
            ) from None
        except Exception as e:
            # Over gRPC the replica's own exception comes back as it was raised, not
            # wrapped in a RayTaskError: a model error, a 500 as on Ray's task path, even
            # when the replica raised one of Fermion's errors.
            raise InferenceFailed(
                f"inference failed on a replica of model {name} version {version}: {_first_line(e)}"
            ) from None

    def _timed_out(self, name: str, version: int) -> NoReturn:
        """Raise what a batch whose wait for a replica ended gets."""
        requested = batch_deadline_ns.get()
        if requested is not None and time.perf_counter_ns() >= requested:
            raise DeadlineExceeded(
                f"deadline passed while model {name} version {version} computed the batch"
            ) from None
        raise Overloaded(
            f"no replica of model {name} version {version} answered within "
            f"{self._ray_config.request_timeout_s:g}s"
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _status_message(status: Any) -> str:
    parts: list[str] = [str(status.message)] if status.message else []
    deployments: Sequence[Any] = list(getattr(status, "deployments", {}).values())
    parts += [str(d.message) for d in deployments if getattr(d, "message", "")]
    return " ".join(parts) or "no message from Ray Serve"
