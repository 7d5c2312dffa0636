"""One inference request, from a resolved model name to an encoded answer.

The transports (HTTP, gRPC) read their own framing and call ``InferenceService.infer``
with the request's body (``RequestBody``: the HTTP V2 body in ``codec.HttpInferBody``, a
``ModelInferRequest`` in ``serving.grpc``); everything between the model name and the
encoded outputs happens here, in one pass: version, decode, limits, sticky version, one
submit to the batcher, encode, the outcome recorded once, the shadow copy. Nothing here
knows a web framework. Routing is reached through ``RoutePolicy``, which the traffic
layer implements.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from model_store.manifest import ModelManifest
from serving.config import ShadowConfig
from serving.errors import FermionError, ModelNotReady, Overloaded
from serving.inference.batcher import DynamicBatcher
from serving.inference.limits import TIMEOUT_HEADER, RequestLimits
from serving.inference.repository import ModelRepository, ServedVersion, VersionBatcher
from serving.inference.tensors import InferRequest
from serving.observability.tracing import recording_span, start_child

__all__ = [
    "InferCall",
    "InferenceService",
    "ModelRoutePolicy",
    "RequestBody",
    "RoutePolicy",
]


_NO_PARAMETERS: Mapping[str, object] = {}
#: How long after a refusal connections keep asking before the body (``refusing``).
_REFUSING_NS = 1_000_000_000


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


#: What a transport's answer is (HTTP: body and headers; gRPC: a response message).
A = TypeVar("A")
A_co = TypeVar("A_co", covariant=True)


class RequestBody(Protocol[A_co]):
    """A request's body in one transport's framing: its tensors, and its answer encoded."""

    async def decode(self, manifest: ModelManifest, max_batch_size: int) -> InferRequest:
        """The request checked against ``manifest`` (InvalidInput when it does not match).

        Called once the model is known to be served (the body is read then), and again
        when a sticky parameter moves the request to a version of another signature.
        """

    def encode(
        self,
        request: InferRequest,
        outputs: Mapping[str, np.ndarray],
        *,
        model_name: str,
        model_version: str,
        manifest: ModelManifest,
        location: str,
    ) -> A_co:
        """The answer carrying ``outputs`` (InferenceFailed when one cannot be encoded).

        ``location`` is where the outputs were computed (local, ray or remote).
        """


@dataclass(frozen=True, slots=True)
class InferCall(Generic[A]):
    """One inference request as a transport hands it over."""

    model: str
    #: The version named by the request (None: the route's or the latest).
    version: str | None
    #: Request headers (or gRPC metadata), lower-case names.
    headers: Mapping[str, str]
    #: The request's body, decoded once the model is known to be served.
    body: RequestBody[A]
    #: ``time.perf_counter_ns()`` when the transport took the request.
    started_ns: int
    #: Per-request state shared with the transport; ``served`` is set to (model, version)
    #: and ``location`` to where the answer was computed.
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
        #: The largest request a transport accepts (after decompression).
        self.max_body_bytes = max_body_bytes
        self._refusing_until_ns = 0

    def refusing(self) -> bool:
        """True while requests are being refused for full queues (and a second after)."""
        return time.monotonic_ns() < self._refusing_until_ns

    def _refused(self) -> None:
        self._refusing_until_ns = time.monotonic_ns() + _REFUSING_NS

    def refusal(
        self, model: str, version: str | None, headers: Mapping[str, str]
    ) -> Overloaded | None:
        """The 503 a request for ``model`` would get from its queue now, else None.

        For a transport that can refuse at the cost of reading a request head, before
        any other work on it, while ``refusing``; the refusal is counted like one from
        ``infer``. Anything else wrong (unknown model, not ready) is left to ``infer``.
        """
        try:
            route = None if version is not None else self._routes.get(model)
            wanted = version if route is None else route.pick(headers)
            served, batcher = self._repository.resolve(model, wanted)
        except FermionError:
            return None
        try:
            timeout = headers.get(TIMEOUT_HEADER)
            now = time.perf_counter_ns()
            if isinstance(batcher, DynamicBatcher):
                batcher.check_admission(self._limits.deadline_ns(timeout, _NO_PARAMETERS, now))
        except Overloaded as e:
            self._refused()
            served.counter.failed(e, now)
            return e
        except FermionError:
            return None
        return None

    async def infer(self, call: InferCall[A]) -> A:
        """The encoded answer to ``call``, or a FermionError.

        Every call's outcome is counted once: on the version that answered or refused it,
        else (unknown model or version) on the model's door counter.
        """
        name, repo, limits = call.model, self._repository, self._limits
        route = None if call.version is not None else self._routes.get(name)
        served: ServedVersion | None = None
        entered = False
        holding: DynamicBatcher | None = None  # the batcher whose queue place this holds
        try:
            # 1. Which version: the route's pick, the pinned one, or the newest READY one;
            #    404/503 before the body is read.
            wanted = call.version if route is None else route.pick(call.headers)
            served = self._find(name, wanted)
            repo.counters.enter(name)
            entered = True
            batcher = served.ready_batcher()
            call.state["served"] = (name, served.version)
            # 2. Admission: a request the queue would shed is refused before its body is read.
            timeout = call.headers.get(TIMEOUT_HEADER)
            if isinstance(batcher, DynamicBatcher):
                try:
                    batcher.admit(limits.deadline_ns(timeout, _NO_PARAMETERS, call.started_ns))
                except Overloaded:
                    self._refused()  # connections refuse from the head for a while
                    raise
                holding = batcher
            # 3. The body, read and decoded against the version's signature.
            body = call.body
            req = await body.decode(served.manifest, self._max_batch(batcher))
            limits.check_elements(req.inputs)
            # 4. A key among the parameters may move the request to its sticky version.
            sticky = route.pick_by_parameter(req.parameters) if route is not None else None
            if sticky is not None and sticky != str(served.version):
                first = served
                served = repo.get(name, sticky)
                batcher = served.ready_batcher()
                call.state["served"] = (name, served.version)
                if not _same_signature(first, served):
                    req = await body.decode(served.manifest, self._max_batch(batcher))
            # 5. One submit, with the request's deadline and priority; it takes over the
            #    queue place (a sticky version's batcher checks for one of its own). An
            #    unversioned request whose version began unloading meanwhile goes to the
            #    newest READY one instead (once).
            deadline_ns = limits.deadline_ns(timeout, req.parameters, call.started_ns)
            priority = limits.priority(req.parameters)
            admitted = holding is batcher
            if admitted:
                holding = None
            try:
                outputs, location = await _submit(
                    batcher, served, req, deadline_ns, priority, admitted=admitted
                )
            except ModelNotReady:
                if wanted is not None or not batcher.closed:
                    raise
                first = served
                served = repo.get(name, None)
                batcher = served.ready_batcher()
                call.state["served"] = (name, served.version)
                if not _same_signature(first, served):
                    req = await body.decode(served.manifest, self._max_batch(batcher))
                outputs, location = await _submit(
                    batcher, served, req, deadline_ns, priority, admitted=False
                )
            call.state["location"] = location
            # 6. The answer, encoded (a model output that cannot be encoded fails here).
            answer = body.encode(
                req,
                outputs,
                model_name=name,
                model_version=str(served.version),
                manifest=served.manifest,
                location=location,
            )
        except Exception as e:
            # 7. The outcome, recorded once: a failure here, a success below.
            counter = served.counter if served is not None else repo.counters.door(name)
            counter.failed(e, call.started_ns)
            raise
        finally:
            if holding is not None:
                holding.release()
            if entered:
                repo.counters.leave(name)
        served.counter.answered(call.started_ns)
        # 8. The shadow copy of a routed request (queued, never awaited).
        if route is not None:
            self._routes.answered(name, route, served, req.inputs, req.batch_size, outputs)
        return answer

    def _find(self, name: str, version: str | None) -> ServedVersion:
        """The served version a request names (404 when none), within a route span."""
        recording = recording_span()
        if recording is None:
            return self._repository.get(name, version)
        # Nothing is started under it, so it is never made current. An unknown model is an
        # answer (404), not an exception to record on the trace.
        span = start_child(*recording, "fermion.route")
        try:
            served = self._repository.get(name, version)
            span.set_attributes({"fermion.model": name, "fermion.version": str(served.version)})
            return served
        finally:
            span.end()

    def _max_batch(self, batcher: VersionBatcher) -> int:
        """The most rows a request to ``batcher`` may have (``limits.max_batch`` caps it)."""
        limit = self._limits.max_batch
        return batcher.max_batch_size if limit is None else min(batcher.max_batch_size, limit)


async def _submit(
    batcher: VersionBatcher,
    served: ServedVersion,
    req: InferRequest,
    deadline_ns: int | None,
    priority: int,
    *,
    admitted: bool,
) -> tuple[dict[str, np.ndarray], str]:
    """The outputs of one submit and the location that computed them.

    ``admitted``: the request already holds a place in ``batcher``'s queue.
    """
    if isinstance(batcher, DynamicBatcher):
        outputs = await batcher.submit(
            req.inputs,
            req.batch_size,
            deadline_ns=deadline_ns,
            priority=priority,
            admitted=admitted,
        )
        return outputs, served.location
    # A local replica and upstreams: the placed batcher says which one computed it.
    return await batcher.submit_located(
        req.inputs, req.batch_size, deadline_ns=deadline_ns, priority=priority
    )


def _same_signature(a: ServedVersion, b: ServedVersion) -> bool:
    """Whether a request decoded for ``a`` is also valid for ``b`` as it is."""
    ma, mb = a.manifest, b.manifest
    return (ma.inputs, ma.outputs, ma.max_batch_size) == (mb.inputs, mb.outputs, mb.max_batch_size)
