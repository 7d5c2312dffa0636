"""One inference request, from a resolved model name to an encoded answer.

The transports (HTTP, gRPC) read their own framing and call ``InferenceService.infer``;
everything between the model name and the encoded outputs happens here, in one pass:
version, body, decode, limits, sticky version, one submit to the batcher, encode,
the outcome recorded once, the shadow copy. Nothing here knows a web framework.
Routing is reached through ``RoutePolicy``, which the traffic layer implements.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from serving.config import ShadowConfig
from serving.errors import InvalidInput, PayloadTooLarge
from serving.inference.batcher import DynamicBatcher
from serving.inference.codec import HEADER_LENGTH, decode_request, encode_response
from serving.inference.limits import TIMEOUT_HEADER, RequestLimits
from serving.inference.repository import ModelRepository, ServedVersion
from serving.observability.tracing import recording_tracer

__all__ = [
    "LOCATION_HEADER",
    "VERSION_HEADER",
    "InferCall",
    "InferenceService",
    "ModelRoutePolicy",
    "RoutePolicy",
]

#: The response header naming the version that answered.
VERSION_HEADER = "fermion-model-version"
#: The response header naming where the answer was computed: local, ray or remote.
LOCATION_HEADER = "fermion-location"


class ModelRoutePolicy(Protocol):
    """One model's route, as far as a request needs it."""

    @property
    def shadow(self) -> ShadowConfig | None:
        """The version requests are mirrored to, if any."""

    def pick(self, headers: Mapping[str, str]) -> str:
        """The version for a request with these headers."""

    def pick_by_parameter(self, parameters: Mapping[str, object]) -> str | None:
        """The sticky version for these request parameters (None: keep the first pick)."""


#: The route type of one ``RoutePolicy``.
R = TypeVar("R", bound=ModelRoutePolicy)


class RoutePolicy(Protocol[R]):
    """Which version answers a model's requests, and what follows an answer."""

    def get(self, name: str) -> R | None:
        """The route of ``name`` (None: requests go to the latest version)."""

    def answered(
        self,
        name: str,
        route: R,
        served: ServedVersion,
        inputs: dict[str, np.ndarray],
        rows: int,
        outputs: dict[str, np.ndarray],
    ) -> None:
        """A routed request was answered by ``served`` (e.g. mirror it to the shadow)."""


@dataclass(frozen=True, slots=True)
class InferCall:
    """One inference request as a transport hands it over."""

    model: str
    #: The version named by the request (None: the route's or the latest).
    version: str | None
    #: Request headers (or gRPC metadata), lower-case names.
    headers: Mapping[str, str]
    #: Reads the whole request body; called once the model is known to be served.
    read_body: Callable[[], Awaitable[bytes]]
    #: ``time.perf_counter_ns()`` when the transport took the request.
    started_ns: int
    #: Per-request state shared with the transport; ``served`` is set to (model, version).
    state: dict[str, Any]


class InferenceService(Generic[R]):
    """Runs V2 inference requests: route, decode, batch, record, encode."""

    def __init__(
        self,
        repository: ModelRepository,
        limits: RequestLimits,
        *,
        routes: RoutePolicy[R],
        max_body_bytes: int,
    ) -> None:
        self._repository = repository
        self._limits = limits
        self._routes = routes
        self._max_body_bytes = max_body_bytes

    async def infer(self, call: InferCall) -> tuple[bytes, dict[str, str]]:
        """The encoded answer to ``call`` and its headers, or a FermionError."""
        name, repo, limits = call.model, self._repository, self._limits
        route = None if call.version is not None else self._routes.get(name)
        served: ServedVersion | None = None
        repo.counters.enter(name)
        try:
            # 1. Which version: the route's pick or the pinned one; 404/503 before the body.
            tracer = recording_tracer()
            wanted = call.version if route is None else route.pick(call.headers)
            if tracer is None:
                served, batcher = repo.resolve(name, wanted)
            else:
                with tracer.start_as_current_span("fermion.route") as span:
                    served, batcher = repo.resolve(name, wanted)
                    span.set_attributes({"fermion.model": name, "fermion.version": served.version})
            call.state["served"] = (name, served.version)
            # 2. The body, inflated and decoded against the version's signature.
            body = _inflate(await call.read_body(), call.headers, self._max_body_bytes)
            header_length = _header_length(call.headers)
            max_batch = batcher.max_batch_size
            if limits.max_batch is not None:
                max_batch = min(max_batch, limits.max_batch)
            req = decode_request(
                body, served.manifest, header_length=header_length, max_batch_size=max_batch
            )
            limits.check_elements(req.inputs)
            # 3. A key among the parameters may move the request to its sticky version.
            sticky = route.pick_by_parameter(req.parameters) if route is not None else None
            if sticky is not None and sticky != str(served.version):
                first = served.manifest
                served, batcher = repo.resolve(name, sticky)
                call.state["served"] = (name, served.version)
                m = served.manifest
                if (m.inputs, m.outputs, m.max_batch_size) != (
                    first.inputs,
                    first.outputs,
                    first.max_batch_size,
                ):
                    req = decode_request(
                        body, m, header_length=header_length, max_batch_size=batcher.max_batch_size
                    )
            # 4. One submit, with the request's deadline and priority.
            deadline_ns = limits.deadline_ns(
                call.headers.get(TIMEOUT_HEADER), req.parameters, call.started_ns
            )
            priority = limits.priority(req.parameters)
            if isinstance(batcher, DynamicBatcher):
                outputs = await batcher.submit(
                    req.inputs, req.batch_size, deadline_ns=deadline_ns, priority=priority
                )
                location = served.location
            else:  # a local replica and upstreams: the answer says which computed it
                outputs, location = await batcher.submit_located(
                    req.inputs, req.batch_size, deadline_ns=deadline_ns, priority=priority
                )
            # 5. The answer, encoded (a model output that cannot be encoded fails here).
            content, headers = encode_response(
                req,
                outputs,
                model_name=name,
                model_version=str(served.version),
                manifest=served.manifest,
            )
        except Exception as e:
            # 6. The outcome, recorded once: a failure here, a success below.
            if served is not None:
                served.counter.failed(e)
            raise
        finally:
            repo.counters.leave(name)
        served.counter.answered(call.started_ns)
        # 7. The shadow copy of a routed request (queued, never awaited).
        if route is not None:
            self._routes.answered(name, route, served, req.inputs, req.batch_size, outputs)
        headers[VERSION_HEADER] = str(served.version)
        headers[LOCATION_HEADER] = location
        return content, headers


def _header_length(headers: Mapping[str, str]) -> int | None:
    raw = headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"invalid {HEADER_LENGTH} header {raw!r}") from None


def _inflate(body: bytes, headers: Mapping[str, str], limit: int) -> bytes:
    """The body as sent, or inflated when gzip-encoded (413 over ``limit`` bytes)."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise InvalidInput(f"unsupported Content-Encoding {encoding!r} (use gzip or identity)")
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidInput(f"invalid gzip body: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request body over the limit of {limit} bytes")
    if not d.eof:
        raise InvalidInput("invalid gzip body: truncated")
    return out
