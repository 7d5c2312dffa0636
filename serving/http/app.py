"""Build the gateway's ASGI app from the configuration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from model_store.store import ModelStore
from serving.auth import AccessControl, ApiKeys, JwtVerifier
from serving.config import ConfigError, FermionConfig
from serving.control.store import create_store
from serving.errors import FermionError
from serving.http.admin import admin_mount
from serving.http.capture import PayloadCapture
from serving.http.drain import DrainState
from serving.http.infer_path import InferPath
from serving.http.middleware.access_log import AccessLogMiddleware, emit_access
from serving.http.middleware.auth import AuthMiddleware
from serving.http.middleware.body_limit import BodySizeLimitMiddleware
from serving.http.middleware.compression import GzipResponseMiddleware
from serving.http.middleware.request_id import RequestIdMiddleware
from serving.http.middleware.tracing import TracingMiddleware
from serving.http.v2 import repository_mount, routes
from serving.inference.backends import Backend, create_backend
from serving.inference.codec import encode_error
from serving.inference.fleet_limits import FleetRateLimiter
from serving.inference.heap import HeapPolicy
from serving.inference.limits import RateLimiter, RequestLimits
from serving.inference.repository import ModelRepository, VersionState
from serving.inference.service import InferenceService
from serving.observability import tracing
from serving.observability.capture import CaptureWriter
from serving.observability.counters import VersionCounters
from serving.observability.host import HostSiblings, merge_prometheus
from serving.observability.metrics import GatewayMetrics
from serving.protocol import parse_infer_path
from serving.traffic.canary import RolloutController
from serving.traffic.fleet import FleetSync, Gateway
from serving.traffic.route_file import RouteFile
from serving.traffic.route_table import RouteTable

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["Companion", "GatewayApp", "create_app"]

#: Something served beside the HTTP app on its event loop (the gRPC server): entered at
#: start, once the backend has started, and left first at shutdown.
Companion = Callable[[Starlette], contextlib.AbstractAsyncContextManager[object]]

log = logging.getLogger("fermion.gateway")


def _error(message: str, status_code: int, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        encode_error(message),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


async def _fermion_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FermionError)
    return _error(exc.message, exc.status_code, exc.headers())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail if exc.status_code != 404 else f"no route for {request.url.path}"
    return _error(str(message), exc.status_code, exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return _error("internal server error", 500)


def _metrics_route(metrics: GatewayMetrics, path: str) -> Route:
    """``GET path`` answering the Prometheus text format."""

    async def endpoint(request: Request) -> Response:
        body = metrics.render()
        siblings: HostSiblings | None = getattr(request.app.state, "siblings", None)
        if siblings is not None:  # --workers: the whole host's counts, whichever answers
            body = merge_prometheus([body, *await siblings.ask("metrics")])
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return Route(path, endpoint, methods=["GET"])


def check_routes(config: FermionConfig, repository: ModelRepository) -> None:
    """Refuse a configuration whose routes send traffic to versions this gateway won't serve.

    Caught at start, a misnamed version fails the deploy with its reason instead of
    failing its share of requests later (the admin API checks a route when it is set).
    """
    for name, route in config.routes.items():
        try:
            served = repository.versions_to_serve(name)
        except FermionError as e:
            raise ConfigError(f"routes.{name}: {e.message}") from None
        missing = sorted(route.versions_in_use() - set(served))
        if missing:
            raise ConfigError(
                f"routes.{name} sends traffic to version(s) {missing}, which this gateway "
                f"does not serve (it serves {served} of {name})"
            )


def _access(config: FermionConfig, metrics: GatewayMetrics | None) -> AccessControl | None:
    """Who may do what, shared by every transport (None: auth is off)."""
    auth = config.auth
    if not auth.enabled:
        return None
    return AccessControl(
        keys=ApiKeys(auth.keys_file) if auth.keys_file is not None else None,
        jwt=JwtVerifier(auth.jwt) if auth.jwt is not None else None,
        on_reject=metrics.reject if metrics is not None else None,
    )


def _capture_writer(config: FermionConfig) -> CaptureWriter | None:
    c = config.capture
    if not c.enabled:
        return None
    return CaptureWriter(
        c.dir, max_file_bytes=c.max_file_bytes, max_files=c.max_files, queue_size=c.queue_size
    )


def _capture(config: FermionConfig, writer: CaptureWriter | None) -> PayloadCapture | None:
    c = config.capture
    if writer is None:
        return None
    return PayloadCapture(
        writer,
        percent=c.percent,
        max_body_bytes=c.max_body_bytes,
        responses=c.responses,
        redact_headers=c.redact_headers,
    )


def _public_paths(config: FermionConfig, metrics: GatewayMetrics | None) -> frozenset[str]:
    """Paths auth lets through (``/metrics`` when configured public)."""
    public = metrics is not None and config.metrics.public
    return frozenset({config.metrics.path} if public else ())


def _middleware(
    config: FermionConfig, metrics: GatewayMetrics | None, access: AccessControl | None
) -> list[Middleware]:
    """The request path of every route but inference (``InferPath``), outermost first; a
    feature that is off adds nothing to it. Rate limits and capture apply to inference
    only, so they are not here."""
    reject = metrics.reject if metrics is not None else None
    tracer = tracing.current_tracer()
    layers = [
        Middleware(RequestIdMiddleware),
        Middleware(TracingMiddleware, tracer=tracer) if tracer is not None else None,
        Middleware(AccessLogMiddleware) if config.server.access_log else None,
        Middleware(AuthMiddleware, access=access, public_paths=_public_paths(config, metrics))
        if access is not None
        else None,
        Middleware(
            BodySizeLimitMiddleware, max_bytes=config.server.max_body_bytes, on_reject=reject
        ),
        Middleware(GzipResponseMiddleware),
    ]
    return [layer for layer in layers if layer is not None]


class GatewayApp(Starlette):
    """The gateway's ASGI app: inference requests go straight to ``infer`` (an
    ``InferPath``); every other request through Starlette's middleware and router."""

    infer: InferPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.infer is not None and scope["type"] == "http" and scope["path"].endswith("/infer"):
            parsed = parse_infer_path(scope["path"])
            if parsed is not None:
                scope["app"] = self
                await self.infer(scope, receive, send, *parsed)
                return
        await super().__call__(scope, receive, send)


def create_app(
    config: FermionConfig,
    *,
    store: ModelStore | None = None,
    backend: Backend | None = None,
    on_ready: Callable[[ModelRepository], None] | None = None,
    config_path: Path | None = None,
    span_exporter: SpanExporter | None = None,
    companions: Sequence[Companion] = (),
    heap: HeapPolicy | None = None,
) -> GatewayApp:
    """The gateway app: loads models in the background at start, drains them at shutdown.

    ``companions`` run beside it on its event loop, over the same app state (service,
    repository, ``access``, ``limiter``): the gRPC server.
    ``on_ready`` is called once every configured model has been loaded (or failed).
    ``config_path`` is the file that route changes are written back to; rollout state
    is kept next to it (``<name>.rollouts.json``). Without it both live in memory.
    ``span_exporter`` receives the spans instead of the configured exporter.
    ``heap``: the process's cycle collector policy, installed while the app runs and
    settled (the heap frozen) once the models are loaded and after each load or unload;
    None (in-process uses, tests) leaves the collector alone.
    """
    store = store or ModelStore(config.store.root)
    backend = backend or create_backend(config, store)
    counters = VersionCounters()
    metrics: GatewayMetrics | None = None
    if config.metrics.enabled:
        metrics = GatewayMetrics(
            counters,
            lambda: (
                (sv.name, sv.version, sv.batcher.queue_depth, sv.batcher.max_queue_size)
                for sv in repository.served()
                if sv.batcher is not None
            ),
            artifacts=lambda: (
                (
                    sv.name,
                    sv.version,
                    str(sv.replica.get("target", "")),
                    str(sv.replica.get("options", {}).get("device", "cpu")),
                )
                for sv in repository.served()
                if sv.replica
            ),
            replicas=backend.replica_counts,
            ready=lambda: (
                repository.readiness().ready and not drain.draining,
                (
                    (sv.name, sv.version, sv.state is VersionState.READY)
                    for sv in repository.served()
                ),
            ),
        )
    repository = ModelRepository(
        config,
        store,
        backend,
        counters=counters,
        on_change=heap.settle if heap is not None else None,
    )
    drain = DrainState()
    check_routes(config, repository)
    tracing.configure(config.tracing, exporter=span_exporter)
    # Control state: in this process (memory), or shared by a fleet through a store.
    control = config.control
    shared = create_store(control)
    gateway = Gateway(
        address=control.advertise or f"{config.server.host}:{config.server.port}",
        backend=config.backend,
    )
    route_table = RouteTable(
        config.routes, repository, route_file=RouteFile(config_path), store=shared
    )
    rollouts = RolloutController(
        route_table,
        repository,
        config_path.with_name(f"{config_path.stem}.rollouts.json") if config_path else None,
        store=shared,
        holder=gateway.id,
        lease_ttl_s=control.lease_ttl_s,
        retry_s=control.sync_interval_s,
    )
    rules = config.limits.rate_limits
    fleet: FleetSync | None = None
    limiter: RateLimiter | None = None
    if rules and shared is not None:
        limiter = FleetRateLimiter(
            rules,
            shared,
            serves=repository.serves,
            live=lambda: fleet.live if fleet is not None else 1,
        )
    elif rules:
        limiter = RateLimiter(rules, serves=repository.serves)
    if shared is not None:
        fleet_limiter = limiter if isinstance(limiter, FleetRateLimiter) else None
        fleet = FleetSync(shared, gateway, control, route_table, rollouts, limiter=fleet_limiter)
    capture = _capture_writer(config)
    if metrics is not None:
        for collector in (
            route_table,
            route_table.shadow,
            rollouts,
            fleet,
            capture,
            repository,
            heap,
            tracing.EXPORT_METRICS,
        ):
            if collector is not None:
                metrics.register(collector)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if heap is not None:
            heap.install()
        await backend.start()
        if fleet is not None:  # the fleet's routes before the first request
            await fleet.start()

        async def load_all() -> None:
            await repository.start()
            await rollouts.start()
            if heap is not None:  # what start-up made is long-lived: out of every scan
                heap.settle()
            if on_ready is not None:
                on_ready(repository)

        loading = asyncio.create_task(load_all())
        try:
            async with contextlib.AsyncExitStack() as beside:
                for companion in companions:
                    await beside.enter_async_context(companion(app))
                yield
        finally:
            if not loading.done():
                loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await rollouts.stop()
            if fleet is not None:
                await fleet.stop()
            await route_table.shadow.stop()
            await repository.stop()
            await backend.stop()
            tracing.shutdown()
            if capture is not None:
                await asyncio.to_thread(capture.close)
            if heap is not None:
                heap.uninstall()

    extra_routes = [_metrics_route(metrics, config.metrics.path)] if metrics is not None else []
    access = _access(config, metrics)
    app = GatewayApp(
        routes=[
            *routes,
            repository_mount(loopback_only=not config.auth.enabled),
            admin_mount(loopback_only=not config.auth.enabled),
            *extra_routes,
        ],
        middleware=_middleware(config, metrics, access),
        exception_handlers={
            FermionError: _fermion_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.drain = drain  # set by the server on SIGTERM; readiness reads it
    app.state.repository = repository
    app.state.metrics = metrics
    app.state.routes = route_table
    app.state.rollouts = rollouts
    app.state.access = access
    app.state.gateway = gateway
    app.state.fleet = fleet
    app.state.limiter = limiter
    app.state.service = service = InferenceService(
        repository,
        RequestLimits(config.limits),
        routes=route_table,
        max_body_bytes=config.server.max_body_bytes,
    )
    app.infer = InferPath(
        service,
        max_body_bytes=config.server.max_body_bytes,
        access=access,
        public_paths=_public_paths(config, metrics),
        limiter=limiter,
        on_reject=metrics.reject if metrics is not None else None,
        access_log=emit_access if config.server.access_log else None,
        capture=_capture(config, capture),
    )
    return app
