"""Declarative configuration: one YAML file, validated at start, unknown keys rejected."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from model_store.manifest import validate_model_name

__all__ = [
    "AuthConfig",
    "BatchingConfig",
    "CaptureConfig",
    "ConfigError",
    "ControlConfig",
    "ExecutorConfig",
    "FermionConfig",
    "LocalBackendConfig",
    "ModelConfig",
    "RayAutoscalingConfig",
    "RayBackendConfig",
    "RayDeploymentConfig",
    "RemoteConfig",
    "RemoteSettings",
    "RolloutBounds",
    "RouteConfig",
    "ServerConfig",
    "ShadowConfig",
    "StickyConfig",
    "StoreConfig",
    "UpstreamHealthConfig",
    "load_config",
    "validation_problems",
]


class ConfigError(ValueError):
    """The configuration file is unreadable or invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Strict):
    """Where the gateway listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    #: The V2 gRPC port (Triton's 8001) on the same host; 0: a free one, printed once
    #: listening (``Fermion gRPC listening on HOST:PORT``); null: no gRPC.
    grpc_port: int | None = Field(default=8001, ge=0, le=65535)
    #: Largest request body, after gzip decompression (413 above it).
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    #: Log one JSON line per request (request id, trace id, key name, model, status, latency).
    access_log: bool = False
    # Connections (enforced by the HTTP server before any application work).
    #: Largest request head, request line and headers together (431 above it).
    max_header_bytes: int = Field(default=32 * 1024, ge=1024, le=1024 * 1024)
    #: Most header fields in one request (431 above it).
    max_headers: int = Field(default=100, ge=8, le=10_000)
    #: Longest a client may take to send a whole request head, from its connection or
    #: from the first byte of its next request (408 and closed; a silent one is closed).
    header_timeout_s: float = Field(default=10.0, gt=0.0, le=600.0)
    #: Longest pause while a request body is read (408 and closed).
    body_timeout_s: float = Field(default=10.0, gt=0.0, le=600.0)
    #: How long an idle keep-alive connection is kept open.
    keep_alive_timeout_s: float = Field(default=5.0, gt=0.0, le=600.0)
    #: Connections the kernel may hold waiting to be accepted (capped by net.core.somaxconn).
    backlog: int = Field(default=4096, ge=16, le=65535)
    # Shutdown.
    #: On SIGTERM: how long readiness answers 503 while the listener still accepts and
    #: serves, so load balancers take the gateway out of rotation before it stops.
    drain_s: float = Field(default=5.0, ge=0.0, le=3600.0)
    #: Then: how long requests in flight may take to finish before they are cancelled.
    shutdown_grace_s: float = Field(default=10.0, ge=0.0, le=3600.0)
    #: Gateway processes on this host, sharing the port (SO_REUSEPORT); above 1 needs
    #: a shared ``control.store``.
    workers: int = Field(default=1, ge=1, le=64)
    #: Readiness as Triton's strict mode: 503 while any configured or store-listed version
    #: failed to load. False: ready once every served model has a ready version.
    strict_readiness: bool = True
    # Python's cycle collector (``serving/inference/heap.py``).
    #: Freeze the heap once the models are loaded and after each model load or unload,
    #: so that the collector's full collections never walk the long-lived objects again.
    gc_freeze: bool = True
    #: The collector's first threshold: tracked objects allocated, net of those freed,
    #: before a young collection; above what requests hold in flight, so that collections
    #: follow the cyclic garbage made, not the traffic. null: Python's own (700).
    gc_young_threshold: int | None = Field(default=20_000, ge=100, le=10_000_000)
    #: The GIL's switch interval (``serving/inference/gil.py``): how long an inference
    #: thread that finished its batch waits for the busy event loop to let go of the GIL.
    #: null: Python's own (5 ms).
    gil_switch_interval_ms: float | None = Field(default=0.2, gt=0.0, le=100.0)


class StoreConfig(_Strict):
    """The model store the gateway serves from."""

    root: Path = Path("model_store")


class BatchingConfig(_Strict):
    """Dynamic batching per model version."""

    #: Upper bound on rows per batch; also capped by the manifest's max_batch_size.
    max_batch_size: int = Field(default=64, ge=1)
    #: How long a request may wait for others while the executor is idle.
    #: 0 dispatches at once: batching then adds no waiting at low load.
    max_queue_delay_ms: float = Field(default=0.0, ge=0.0, le=10_000.0)
    #: Requests waiting per model version before new ones get 503.
    max_queue_size: int = Field(default=2048, ge=1)
    #: Batches computed at the same time per model version.
    max_concurrent_batches: int = Field(default=1, ge=1, le=64)
    #: Priority levels of the queue (Triton's queue policy): 1 is served first.
    #: 0 or 1: one level, the V2 ``priority`` parameter is ignored.
    priority_levels: int = Field(default=0, ge=0, le=16)
    #: The level of requests without a priority; 0: the lowest level.
    default_priority_level: int = Field(default=0, ge=0, le=16)

    @model_validator(mode="after")
    def _check_default_level(self) -> BatchingConfig:
        if self.default_priority_level > max(self.priority_levels, 1):
            raise ValueError("default_priority_level must be at most priority_levels")
        return self


class ExecutorConfig(_Strict):
    """How executors run on this host."""

    #: Threads inside one ONNX Runtime run (intra-op); 0 lets the runtime choose.
    intra_op_threads: int = Field(default=1, ge=0)
    #: Artifact targets (``torch``) or targets on a device (``torch:cuda``) in order of
    #: preference; the first that fits the host wins. GPU first; on a CPU, ONNX Runtime
    #: before torch, which would load torch into the server.
    prefer: list[str] = Field(
        default_factory=lambda: ["tensorrt", "torch:cuda", "onnxruntime", "torch"]
    )


class RayAutoscalingConfig(_Strict):
    """How many replicas one model version's Ray Serve deployment runs."""

    #: Fewest replicas. 0 scales to zero when idle; a request arriving then waits
    #: (within ``ray.request_timeout_s``) for a replica to start instead of failing.
    min_replicas: int = Field(default=1, ge=0)
    #: Most replicas.
    max_replicas: int = Field(default=1, ge=1)
    #: Replicas started at load. None: max(1, min_replicas), so that the artifact is
    #: loaded and warmed up once before the version is ready, even with min_replicas 0.
    initial_replicas: int | None = Field(default=None, ge=0)
    #: Batches in flight per replica the autoscaler aims for. Counted in batches: the
    #: gateway batches before the hop and each remote call carries one whole batch.
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    #: Load must stay above target this long before replicas are added.
    upscale_delay_s: float = Field(default=30.0, ge=0)
    #: Load must stay below target this long before replicas are removed.
    downscale_delay_s: float = Field(default=600.0, ge=0)
    #: How often replicas and the gateway report their load to the autoscaler.
    metrics_interval_s: float = Field(default=10.0, gt=0)
    #: Window over which the reported load is averaged.
    look_back_period_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> RayAutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must be between min_replicas and max_replicas")
        return self


class RayDeploymentConfig(_Strict):
    """One model version's Ray Serve deployment: replica resources and autoscaling."""

    #: CPUs reserved per replica (fractions allowed).
    num_cpus: float = Field(default=1.0, ge=0)
    #: GPUs per replica. None: 1 when the artifact ``executor.prefer`` ranks first
    #: needs a GPU (tensorrt) and the cluster has one, else 0.
    num_gpus: float | None = Field(default=None, ge=0)
    #: Memory reserved per replica in MiB, for Ray's scheduler. None: none reserved.
    memory_mb: int | None = Field(default=None, ge=1)
    #: Batches one replica accepts at once. None: the version's
    #: ``batching.max_concurrent_batches`` + 1 (a gateway's batches in flight, plus one).
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    #: How often Serve's controller checks each replica. A replica that died is
    #: replaced only once a check finds it (a batch on a dead replica's channel is
    #: retried through Serve's handle, which waits for the replacement), so this bounds
    #: how long a kill leaves a version without replicas; Serve's own default is 10 s.
    health_check_period_s: float = Field(default=2.0, gt=0)
    autoscaling: RayAutoscalingConfig = Field(default_factory=RayAutoscalingConfig)


class RayBackendConfig(_Strict):
    """Backend ``ray``: the cluster to use and the defaults of every deployment."""

    #: None: start a local cluster on 127.0.0.1, stopped with the gateway. Otherwise
    #: join this cluster ("auto", "10.0.0.5:6379", "ray://head:10001") and never stop it.
    address: str | None = None
    #: Ray namespace of the gateway; it also names the deployments (applications
    #: ``<namespace>.<model>.<version>``), so gateways with one namespace share them.
    namespace: str = Field(default="fermion", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    #: Local cluster only: CPUs it offers to replicas. None: every core.
    num_cpus: int | None = Field(default=None, ge=1)
    #: Local cluster only: run Ray's dashboard (Ray's state API and ``ray list`` need it).
    include_dashboard: bool = False
    #: Longest wait for the cluster to start, or to accept the gateway.
    start_timeout_s: float = Field(default=120.0, gt=0)
    #: Longest wait for a version's replicas to load their artifact and warm up.
    load_timeout_s: float = Field(default=300.0, gt=0)
    #: Longest wait for one batch's answer, retry and a replica started from zero included;
    #: past it the batch's requests get 503.
    request_timeout_s: float = Field(default=30.0, gt=0)
    #: Batches go over Fermion's own channel to the replicas (a TCP port per replica,
    #: on its node's address) instead of Ray Serve's handle, autoscaling deployments'
    #: too (sized by ``backends.ray_policy``). False: always the handle (e.g. where
    #: gateways cannot reach the nodes' ports).
    channel: bool = True
    #: Every model's deployment, unless ``models.<name>.ray`` replaces it.
    deployment: RayDeploymentConfig = Field(default_factory=RayDeploymentConfig)


class ModelConfig(_Strict):
    """Per-model settings; anything left out takes the top-level default."""

    #: "all", "latest", or an explicit list of version numbers.
    versions: Literal["all", "latest"] | list[int] = "all"
    batching: BatchingConfig | None = None
    executor: ExecutorConfig | None = None
    #: Backend ray: this model's deployments (replaces ``ray.deployment`` whole).
    ray: RayDeploymentConfig | None = None
    #: Upstream V2 servers computing this model (over the top-level ``remote``).
    remote: RemoteConfig | None = None


class UpstreamHealthConfig(_Strict):
    """How the gateway watches the upstreams of a remote version."""

    #: Active check: every interval, each upstream's ``/v2/health/ready`` and model ready.
    interval_s: float = Field(default=2.0, gt=0)
    #: Longest wait for one check's answer.
    timeout_s: float = Field(default=1.0, gt=0)
    #: Passive check: this many batches in a row that got no answer (refused, reset,
    #: timed out, 502/503) open the upstream's circuit; it gets no traffic while open.
    failures_to_open: int = Field(default=3, ge=1)
    #: An open circuit lets one trial batch through after this long (half-open); a failed
    #: trial doubles the wait, up to ``max_open_s``. A passing active check closes it.
    open_s: float = Field(default=5.0, gt=0)
    max_open_s: float = Field(default=60.0, gt=0)


#: Where the answers of a version with a local replica and upstreams come from.
RemotePolicy = Literal["remote", "local", "local-first", "remote-first", "split"]


class RemoteSettings(_Strict):
    """Upstream V2 servers that compute a model version (backend ``remote``).

    Set at three levels, each key overriding the one above: ``remote`` (every
    model), ``models.<name>.remote``, ``models.<name>.remote.versions.<v>``.
    """

    #: Base URLs of upstream V2 servers (``http://host:port``); requests spread over the
    #: healthy ones.
    urls: list[str] = Field(default_factory=list)
    #: The model's name upstream (None: the same name).
    model: str | None = None
    #: The version upstream (None: the same number; "": the unversioned path).
    version: str | None = None
    #: Headers sent with every upstream request (e.g. ``Authorization``).
    headers: dict[str, str] = Field(default_factory=dict)
    #: Tensors as the binary tensor extension (Fermion, Triton, KServe); False: JSON
    #: (servers without the extension, e.g. MLServer's REST).
    binary: bool = True
    #: Longest wait for one batch's answer, a retry on another upstream included
    #: (and never past the batch's requests' deadline).
    timeout_s: float = Field(default=30.0, gt=0)
    #: Longest wait for a new connection.
    connect_timeout_s: float = Field(default=2.0, gt=0)
    #: Rows the upstream accepts in one request; it replaces ``batching.max_batch_size``
    #: for the batches sent upstream. None: the batching one, capped by the manifest's,
    #: which for a model not in the local store is the upstream ``/config``'s
    #: max_batch_size (Triton, Fermion), else 0: requests are sent one by one, unbatched.
    max_batch_size: int | None = Field(default=None, ge=0)
    #: Connections kept open to each upstream.
    pool_size: int = Field(default=16, ge=1, le=1024)
    #: Batches in flight to the upstreams per version. None: 2 per upstream URL.
    max_concurrent_batches: int | None = Field(default=None, ge=1, le=1024)
    #: Longest wait at load for an upstream to be ready (and, for a model not in the
    #: local store, for its metadata).
    load_timeout_s: float = Field(default=30.0, gt=0)
    #: ``remote``: only the upstreams compute. ``local``: only the local replica (a
    #: model whose other versions are remote). With both (backend local or ray):
    #: ``local-first`` (remote when a request would wait locally behind
    #: ``overflow_queue_depth`` others, or the local replica is not ready),
    #: ``remote-first`` (local when no upstream is up), ``split`` (``remote_percent``
    #: of requests remote, while an upstream is up).
    policy: RemotePolicy = "remote"
    overflow_queue_depth: int = Field(default=8, ge=0)
    remote_percent: float = Field(default=50.0, ge=0.0, le=100.0)
    health: UpstreamHealthConfig = Field(default_factory=UpstreamHealthConfig)

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        checked = []
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
            if parts.query or parts.fragment:
                raise ValueError(f"{url!r}: a base URL has no query or fragment")
            checked.append(url.rstrip("/"))
        if len(set(checked)) != len(checked):
            raise ValueError("an upstream URL is listed twice")
        return checked

    def merged(self, over: RemoteSettings) -> RemoteSettings:
        """These settings with the keys set in ``over`` replaced."""
        update = {
            f: getattr(over, f) for f in over.model_fields_set if f in RemoteSettings.model_fields
        }
        return self.model_copy(update=update)


class RemoteConfig(RemoteSettings):
    """A model's upstream settings (``models.<name>.remote``), and its versions' own."""

    #: Version -> settings of that version (e.g. another upstream model or version).
    versions: dict[int, RemoteSettings] = Field(default_factory=dict)


class StickyConfig(_Strict):
    """Sticky assignment: requests with the same key always get the same version."""

    #: Take the key from this request header (e.g. ``x-user-id``)...
    header: str | None = None
    #: ...or from this request-level V2 parameter (e.g. ``user_id``).
    parameter: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StickyConfig:
        if (self.header is None) == (self.parameter is None):
            raise ValueError("give exactly one of header or parameter")
        if self.header is not None:
            self.header = self.header.lower()
        return self


class ShadowConfig(_Strict):
    """Mirror a share of a route's requests to another version and compare outputs."""

    version: int = Field(ge=1)
    #: Share of requests mirrored, in percent.
    percent: float = Field(default=100.0, ge=0.0, le=100.0)
    #: Shed shadow work while the shadow's (or the primary's) queue holds this many requests.
    max_queue_depth: int = Field(default=4, ge=1)
    #: Shadow requests in flight at most; more are shed.
    max_in_flight: int = Field(default=64, ge=1)


class RolloutBounds(_Strict):
    """What an automatic canary must keep to, candidate against baseline, per interval."""

    #: Candidate error rate may exceed the baseline's by at most this (0.01 = 1 point).
    max_error_rate_increase: float = Field(default=0.01, ge=0.0, le=1.0)
    #: Candidate p99 latency may be at most this times the baseline's, plus the slack.
    max_p99_ratio: float = Field(default=1.5, ge=1.0)
    p99_slack_ms: float = Field(default=10.0, ge=0.0)
    #: Shadow phase: top-1 agreement with the baseline at least this (None: not checked).
    min_top1_agreement: float | None = Field(default=None, ge=0.0, le=1.0)
    #: Shadow phase: largest absolute output difference at most this (None: not checked).
    max_abs_diff: float | None = Field(default=None, ge=0.0)
    #: Requests the candidate (and, below 100%, the baseline) need before an interval is
    #: judged; with fewer the step waits another interval.
    min_requests: int = Field(default=20, ge=1)
    #: Intervals in a row over the p99 bound before the candidate is rolled back: a pause
    #: of the host catches whatever requests are in flight and breaches one interval, a
    #: slow version breaches every one. Error and shadow breaches roll back at once.
    p99_breaches: int = Field(default=2, ge=1, le=100)


#: The largest split weight: shares are weight / sum, which must stay finite and exact.
_MAX_WEIGHT = 1e9


class RouteConfig(_Strict):
    """A public model name served by weighted versions of that model."""

    #: Version -> weight (any non-negative numbers; shares are weight / sum).
    split: dict[int, float]
    sticky: StickyConfig | None = None
    shadow: ShadowConfig | None = None
    rollout: RolloutBounds = Field(default_factory=RolloutBounds)

    @field_validator("split")
    @classmethod
    def _check_split(cls, split: dict[int, float]) -> dict[int, float]:
        if any(v < 1 for v in split):
            raise ValueError("versions are numbers from 1")
        if any(not 0 <= w <= _MAX_WEIGHT for w in split.values()):  # NaN fails too
            raise ValueError(f"weights must be between 0 and {_MAX_WEIGHT:.0f}")
        if sum(split.values()) <= 0:
            raise ValueError("at least one version needs a positive weight")
        return split

    def versions_in_use(self) -> set[int]:
        """The versions this route sends requests to: a positive weight, or the shadow."""
        used = {v for v, w in self.split.items() if w > 0}
        if self.shadow is not None:
            used.add(self.shadow.version)
        return used


class LocalBackendConfig(_Strict):
    """Backend ``local``: replicas in the gateway process."""

    #: Worker threads that run inference.
    inference_threads: int = Field(default=2, ge=1, le=256)
    #: Opt-in (0: never, the default): a batch of a version whose traffic comes one
    #: request at a time (nothing queued, decoding or in the pool) runs on the event loop
    #: itself when the version's last run took at most this long, skipping two thread
    #: hand-offs; the loop then blocks for up to this long, an exception to the rule
    #: that inference never blocks it.
    inline_max_ms: float = Field(default=0.0, ge=0, le=10)


#: JWT algorithms accepted: asymmetric only, so a public key can never act as an HMAC secret.
_ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class JwtConfig(_Strict):
    """JWT bearer tokens, verified against one public key or a JWKS file."""

    #: PEM public key file (exactly one of public_key_file and jwks_file).
    public_key_file: Path | None = None
    #: JWKS file (``{"keys": [...]}``); the token's ``kid`` picks the key.
    jwks_file: Path | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"], min_length=1)
    #: Required ``iss`` and ``aud`` (None: not checked).
    issuer: str | None = None
    audience: str | None = None
    #: Claim holding the scopes: a space-separated string or a list.
    scopes_claim: str = "scope"
    #: Claim naming the caller in logs and rate limits.
    name_claim: str = "sub"
    leeway_s: float = Field(default=0.0, ge=0.0, le=300.0)

    @field_validator("algorithms")
    @classmethod
    def _check_algorithms(cls, algorithms: list[str]) -> list[str]:
        bad = [a for a in algorithms if a not in _ASYMMETRIC_ALGORITHMS]
        if bad:
            raise ValueError(
                f"algorithms {bad} not accepted; use asymmetric ones: "
                f"{', '.join(sorted(_ASYMMETRIC_ALGORITHMS))}"
            )
        return algorithms

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtConfig:
        if (self.public_key_file is None) == (self.jwks_file is None):
            raise ValueError("set exactly one of public_key_file and jwks_file")
        return self


class AuthConfig(_Strict):
    """Who may call what. Auth is on when a keys file or JWT is configured."""

    #: API keys file written by ``fermion keys`` (hashes only); reloaded when it changes.
    keys_file: Path | None = None
    jwt: JwtConfig | None = None

    @property
    def enabled(self) -> bool:
        """True when any credential source is configured."""
        return self.keys_file is not None or self.jwt is not None


class RateLimitRule(_Strict):
    """A token bucket per caller, for inference on the models matching ``models``."""

    #: Glob over key names (JWT: the name claim; no auth: ``ip:<address>``).
    keys: str = "*"
    #: Glob over model names.
    models: str = "*"
    #: Sustained requests per second, and the burst allowed above it.
    rate: float = Field(gt=0.0)
    burst: int = Field(default=1, ge=1)


class LimitsConfig(_Strict):
    """Per-request limits, rate limits and deadlines."""

    rate_limits: list[RateLimitRule] = Field(default_factory=list)
    #: Most tensor elements (all inputs together) in one request (400 above it).
    max_elements: int | None = Field(default=None, ge=1)
    #: Most rows (dim 0) in one request (400 above it).
    max_batch: int | None = Field(default=None, ge=1)
    #: Deadline of requests that carry none (None: no deadline).
    default_timeout_ms: float | None = Field(default=None, gt=0.0)
    #: Cap on any request's deadline (``fermion-timeout-ms`` or the V2 ``timeout``).
    max_timeout_ms: float = Field(default=60_000.0, gt=0.0)


class TracingConfig(_Strict):
    """OpenTelemetry traces.

    A key left out of the file takes the standard ``OTEL_*`` environment variable
    (``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, ``_PROTOCOL``,
    ``_HEADERS``, ``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER[_ARG]``), then the default
    below; a key set in the file wins (see ``serving.observability.tracing.resolve``).
    """

    exporter: Literal["none", "console", "otlp-http", "otlp-grpc"] = "none"
    #: OTLP endpoint: the traces URL for otlp-http, ``http://host:port`` for otlp-grpc.
    #: None: from the environment, else the local collector's default.
    endpoint: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    #: OTEL_TRACES_SAMPLER's names; the ratio applies to the traceidratio ones.
    sampler: Literal[
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    ] = "parentbased_traceidratio"
    #: Share of new traces recorded (requests with a sampled parent always are).
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    service_name: str = "fermion"
    #: otlp-http/otlp-grpc: encode and post from a child process, off the gateway's GIL
    #: (``serving/observability/export_process.py``); false: a thread of the gateway.
    export_process: bool = False


class MetricsConfig(_Strict):
    """Prometheus metrics."""

    enabled: bool = True
    path: str = Field(default="/metrics", pattern=r"^/[A-Za-z0-9_/.-]*$")
    #: Open to anyone even when auth is on; false: needs the ``read`` scope.
    public: bool = True


class ControlConfig(_Strict):
    """Where control state lives: routes, rollouts and their driver's lease, rate-limit
    buckets, canary figures. ``memory``: this process only; a Redis URL: a fleet."""

    #: ``memory`` (one process) or ``redis://host:6379/0`` (``rediss://`` for TLS).
    store: str = Field(default="memory", pattern=r"^(memory|rediss?://\S+)$")
    #: Prefix of every key in the store, so that several fleets may share one Redis.
    key_prefix: str = Field(default="fermion", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
    #: How often a gateway reads route changes and publishes canary figures.
    sync_interval_s: float = Field(default=0.25, ge=0.02, le=5.0)
    #: How often a gateway writes its heartbeat; it counts as gone after 3 missed ones.
    heartbeat_s: float = Field(default=1.0, ge=0.1, le=60.0)
    #: A rollout driver's lease: another gateway takes the rollout over this long after
    #: the driver stopped renewing it.
    lease_ttl_s: float = Field(default=2.0, ge=0.2, le=60.0)
    #: Longest wait for one store call; past it the store counts as down.
    timeout_s: float = Field(default=0.5, gt=0.0, le=10.0)
    #: This gateway's address as ``fermion fleet status`` shows it (None: host:port).
    advertise: str | None = None

    @property
    def shared(self) -> bool:
        """True when the store is shared between processes (not ``memory``)."""
        return self.store != "memory"


class CaptureConfig(_Strict):
    """Sampled payload capture for ``fermion loadtest replay`` (off while ``percent`` is 0)."""

    #: Share of inference requests captured, in percent.
    percent: float = Field(default=0.0, ge=0.0, le=100.0)
    #: Folder of the rotating ``capture-<pid>-<seq>.jsonl`` files.
    dir: Path = Path("fermion-capture")
    #: A file is closed after the record that takes it past this size.
    max_file_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)
    #: The oldest files of the folder are removed beyond this many.
    max_files: int = Field(default=8, ge=1, le=10_000)
    #: Larger request (or answer) bodies are recorded without their bytes.
    max_body_bytes: int = Field(default=1024 * 1024, ge=0)
    #: Records waiting for the writer; beyond it they are dropped (and counted).
    queue_size: int = Field(default=1024, ge=1, le=1_000_000)
    #: Also record the answers' bodies.
    responses: bool = True
    #: Headers left out besides the credential headers (authorization, cookie, ...).
    redact_headers: list[str] = Field(default_factory=list)

    @property
    def enabled(self) -> bool:
        """Whether any request is captured."""
        return self.percent > 0


class FermionConfig(_Strict):
    """The whole gateway configuration (``fermion.yaml``)."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    backend: Literal["local", "ray", "remote"] = "local"
    local: LocalBackendConfig = Field(default_factory=LocalBackendConfig)
    ray: RayBackendConfig = Field(default_factory=RayBackendConfig)
    #: Upstream V2 servers: every model's with backend remote, else defaults for the
    #: models that set ``models.<name>.remote``.
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    #: Models to serve. Empty: every model in the store, with the defaults above.
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    #: A/B routes: public model name -> weighted versions, stickiness, shadow, canary bounds.
    routes: dict[str, RouteConfig] = Field(default_factory=dict)
    control: ControlConfig = Field(default_factory=ControlConfig)

    @model_validator(mode="after")
    def _workers_need_a_shared_store(self) -> FermionConfig:
        if self.server.workers > 1 and not self.control.shared:
            raise ValueError(
                f"server.workers {self.server.workers} needs a shared control store: set "
                "control.store to a Redis URL (redis://host:6379/0); with the default "
                "'memory' each worker would keep its own routes, rollouts and rate limits"
            )
        if self.server.workers > 1 and self.backend == "ray" and self.ray.address is None:
            raise ValueError(
                "server.workers above 1 with backend ray needs ray.address: each worker "
                "would otherwise start a Ray cluster of its own (start one with "
                "`ray start --head` and set ray.address: auto)"
            )
        return self

    @field_validator("models", "routes")
    @classmethod
    def _check_names(cls, models: dict[str, Any]) -> dict[str, Any]:
        for name in models:
            validate_model_name(name)
        return models

    @model_validator(mode="after")
    def _check_remote(self) -> FermionConfig:
        if self.backend == "remote" and not self.models and not self.remote.urls:
            raise ValueError("backend remote serves every model from remote.urls: give some")
        for name, mc in self.models.items():
            if mc.remote is None and self.backend != "remote":
                continue
            for where, settings in self._remote_levels(name):
                if settings.policy == "local" and self.backend != "remote":
                    continue
                if not settings.urls:
                    raise ValueError(f"{where}: no upstream URL (set urls here or above)")
                if settings.policy != "remote" and self.backend == "remote":
                    raise ValueError(
                        f"{where}: policy {settings.policy} needs a local replica: "
                        "use backend local or ray"
                    )
        return self

    def _remote_levels(self, model: str) -> list[tuple[str, RemoteSettings]]:
        mc = self.models.get(model)
        block = mc.remote if mc is not None else None
        base = self.remote if block is None else self.remote.merged(block)
        levels = [(f"models.{model}.remote", base)]
        for version, own in (block.versions if block is not None else {}).items():
            levels.append((f"models.{model}.remote.versions.{version}", base.merged(own)))
        return levels

    def remote_for(self, model: str, version: int) -> RemoteSettings | None:
        """The upstream settings of one version, or None when no upstream computes it."""
        mc = self.models.get(model)
        block = mc.remote if mc is not None else None
        if block is None and self.backend != "remote":
            return None
        settings = self.remote if block is None else self.remote.merged(block)
        own = block.versions.get(version) if block is not None else None
        settings = settings if own is None else settings.merged(own)
        return None if settings.policy == "local" else settings

    def upstream_versions(self, model: str) -> list[int]:
        """Versions of ``model`` declared under ``models.<name>.remote.versions`` that only
        upstreams compute: they are served even when the local store lacks them."""
        mc = self.models.get(model)
        if mc is None or mc.remote is None:
            return []
        return sorted(
            v
            for v in mc.remote.versions
            if (s := self.remote_for(model, v)) is not None and s.policy == "remote"
        )

    def uses_remote(self) -> bool:
        """True when some model version is computed by upstream V2 servers."""
        return self.backend == "remote" or any(m.remote for m in self.models.values())

    def batching_for(self, model: str) -> BatchingConfig:
        """The batching settings of ``model``."""
        mc = self.models.get(model)
        return mc.batching if mc and mc.batching else self.batching

    def executor_for(self, model: str) -> ExecutorConfig:
        """The executor settings of ``model``."""
        mc = self.models.get(model)
        return mc.executor if mc and mc.executor else self.executor

    def ray_deployment_for(self, model: str) -> RayDeploymentConfig:
        """The Ray Serve deployment settings of ``model`` (backend ray)."""
        mc = self.models.get(model)
        return mc.ray if mc and mc.ray else self.ray.deployment


def validation_problems(err: ValidationError, *, root: str = "<root>") -> list[str]:
    """Each problem of ``err`` as ``"dotted.path: message"``; an unknown key says so.

    ``root`` names the path of a problem with the whole document.
    """
    problems = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or root
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        problems.append(f"{path}: {msg}")
    return problems


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    lines.extend(f"  {problem}" for problem in validation_problems(err))
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> FermionConfig:
    """Read and validate ``path`` (or the defaults), then apply dotted ``overrides``.

    Raises ConfigError with the offending key's path on any problem.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read configuration {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"configuration {path} is not valid YAML: {e}") from e
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"configuration {path} must be a mapping at the top level")
        data = raw
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot override {dotted}: {key} is not a mapping")
            node = child
        node[leaf] = value
    try:
        return FermionConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from e
