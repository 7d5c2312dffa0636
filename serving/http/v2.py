"""KServe V2 REST routes: health, metadata, config, statistics, inference, repository."""

from __future__ import annotations

import time
import zlib
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving.errors import InvalidInput, ModelNotFound, PayloadTooLarge
from serving.inference.batcher import DynamicBatcher
from serving.inference.codec import HEADER_LENGTH, InferRequest, decode_request, encode_response
from serving.inference.limits import TIMEOUT_HEADER, RequestLimits
from serving.inference.repository import ModelRepository, ServedVersion, VersionState
from serving.observability.metrics import GatewayMetrics
from serving.observability.tracing import recording_tracer
from serving.traffic.router import VERSION_HEADER, ModelRoute, Router

__all__ = ["SERVER_NAME", "SERVER_VERSION", "infer_body", "routes"]

SERVER_NAME = "fermion"
SERVER_VERSION = "0.1.0"
_EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics"]
_TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}


def _json(data: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status_code, media_type="application/json")


def _repo(request: Request) -> ModelRepository:
    repo: ModelRepository = request.app.state.repository
    return repo


async def server_metadata(request: Request) -> Response:
    return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": _EXTENSIONS})


async def live(request: Request) -> Response:
    return _json({"live": True})


async def ready(request: Request) -> Response:
    is_ready = _repo(request).ready
    return _json({"ready": is_ready}, 200 if is_ready else 503)


def _tensors(specs: Any) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in specs]


async def model_metadata(request: Request) -> Response:
    repo = _repo(request)
    name = request.path_params["model"]
    sv = repo.get(name, request.path_params.get("version"))
    versions = repo.versions(name)
    m = sv.manifest
    return _json(
        {
            "name": name,
            "versions": [str(v) for v in sorted(versions)],
            "platform": m.platform,
            "inputs": _tensors(m.inputs),
            "outputs": _tensors(m.outputs),
        }
    )


async def model_ready(request: Request) -> Response:
    repo = _repo(request)
    sv = repo.get(request.path_params["model"], request.path_params.get("version"))
    is_ready = sv.state is VersionState.READY
    return _json(
        {"name": sv.name, "version": str(sv.version), "ready": is_ready},
        200 if is_ready else 503,
    )


def _config_tensors(sv: ServedVersion, specs: Any) -> list[dict[str, Any]]:
    batched = sv.manifest.max_batch_size > 0
    return [
        {
            "name": t.name,
            "data_type": _TRITON_TYPES[t.datatype],
            "datatype": t.datatype,
            "dims": t.shape[1:] if batched else t.shape,
        }
        for t in specs
    ]


async def model_config(request: Request) -> Response:
    sv = _repo(request).get(request.path_params["model"], request.path_params.get("version"))
    m = sv.manifest
    b = sv.batcher
    config: dict[str, Any] = {
        "name": m.name,
        "version": str(m.version),
        "platform": m.platform,
        "backend": request.app.state.config.backend,
        "max_batch_size": b.max_batch_size if b and m.max_batch_size > 0 else m.max_batch_size,
        "input": _config_tensors(sv, m.inputs),
        "output": _config_tensors(sv, m.outputs),
        "state": sv.state.value,
        "artifact": sv.replica,
        "artifacts": [
            {"target": a.target, "file": a.file, "size": a.size, "options": a.options}
            for a in m.artifacts
        ],
        "metadata": m.metadata,
    }
    if b is not None:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": int(b.max_queue_delay_s * 1e6),
            "max_queue_size": b.max_queue_size,
            "max_concurrent_batches": b.max_concurrent_batches,
        }
    if sv.reason:
        config["reason"] = sv.reason
    return _json(config)


def _duration(d: Any) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def _version_stats(sv: ServedVersion) -> dict[str, Any]:
    row: dict[str, Any] = {"name": sv.name, "version": str(sv.version)}
    b = sv.batcher
    if b is None:
        return row | {"inference_count": 0, "execution_count": 0}
    s = b.stats
    return row | {
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "queue_depth": b.queue_depth,
        "inference_stats": {
            "success": _duration(s.success),
            "fail": _duration(s.fail),
            "queue": _duration(s.queue),
            "compute_infer": _duration(s.compute),
            "rejected": {"count": s.rejected, "ns": 0},
        },
        "batch_stats": [
            {"batch_size": size, "compute_infer": _duration(d)}
            for size, d in sorted(s.batch_sizes.items())
        ],
    }


async def model_stats(request: Request) -> Response:
    repo = _repo(request)
    name = request.path_params.get("model")
    if name is None:
        served = [sv for n in repo.configured_models() for sv in _served(repo, n)]
    elif "version" in request.path_params:
        served = [repo.get(name, request.path_params["version"])]
    else:
        served = list(repo.versions(name).values())
    return _json({"model_stats": [_version_stats(sv) for sv in served]})


def _served(repo: ModelRepository, name: str) -> list[ServedVersion]:
    try:
        return list(repo.versions(name).values())
    except ModelNotFound:
        return []


async def _read_body(request: Request) -> bytes:
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise InvalidInput(f"unsupported Content-Encoding {encoding!r} (use gzip or identity)")
    limit: int = request.app.state.config.server.max_body_bytes
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


async def infer(request: Request) -> Response:
    """POST .../infer through Starlette's router (the fast path in fastpath.py serves it first)."""
    content, headers = await infer_body(request)
    return Response(content, headers=headers)


async def infer_body(request: Request) -> tuple[bytes, dict[str, str]]:
    """Run one V2 inference request: the response body and headers, or a FermionError."""
    started_ns = time.perf_counter_ns()
    metrics: GatewayMetrics | None = request.app.state.metrics
    if metrics is None:
        return await _infer(request, started_ns)
    state = request.scope.setdefault("state", {})
    return await metrics.track(
        _infer(request, started_ns), request.path_params["model"], state, started_ns
    )


async def _infer(request: Request, started_ns: int) -> tuple[bytes, dict[str, str]]:
    name = request.path_params["model"]
    pinned = request.path_params.get("version")
    repo = _repo(request)
    route: ModelRoute | None = None if pinned is not None else request.app.state.router.get(name)
    tracer = recording_tracer()
    if tracer is None:
        sv, batcher = repo.resolve(name, pinned if route is None else route.pick(request.headers))
    else:
        with tracer.start_as_current_span("fermion.route") as span:
            sv, batcher = repo.resolve(
                name, pinned if route is None else route.pick(request.headers)
            )
            span.set_attributes({"fermion.model": name, "fermion.version": sv.version})
    state = request.scope.setdefault("state", {})
    state["served"] = (name, sv.version)
    limits: RequestLimits = request.app.state.limits
    body = await _read_body(request)
    header_length: int | None = None
    raw = request.headers.get(HEADER_LENGTH)
    if raw is not None:
        try:
            header_length = int(raw)
        except ValueError:
            raise InvalidInput(f"invalid {HEADER_LENGTH} header {raw!r}") from None
    max_batch = batcher.max_batch_size
    if limits.max_batch is not None:
        max_batch = min(max_batch, limits.max_batch)
    req = decode_request(body, sv.manifest, header_length=header_length, max_batch_size=max_batch)
    limits.check_elements(req.inputs)
    if route is None:
        outputs = await batcher.submit(
            req.inputs,
            req.batch_size,
            deadline_ns=limits.deadline_ns(
                request.headers.get(TIMEOUT_HEADER), req.parameters, started_ns
            ),
            priority=limits.priority(req.parameters),
        )
    else:
        if route.parameter is not None:
            sv, batcher, req = _stick_by_parameter(
                route, repo, sv, batcher, req, body, header_length
            )
            state["served"] = (name, sv.version)
        router: Router = request.app.state.router
        outputs = await router.submit(
            route,
            sv,
            batcher,
            req.inputs,
            req.batch_size,
            deadline_ns=limits.deadline_ns(
                request.headers.get(TIMEOUT_HEADER), req.parameters, started_ns
            ),
            priority=limits.priority(req.parameters),
        )
    content, headers = encode_response(
        req, outputs, model_name=name, model_version=str(sv.version), manifest=sv.manifest
    )
    headers[VERSION_HEADER] = str(sv.version)
    return content, headers


def _stick_by_parameter(
    route: ModelRoute,
    repo: ModelRepository,
    sv: ServedVersion,
    batcher: DynamicBatcher,
    req: InferRequest,
    body: bytes,
    header_length: int | None,
) -> tuple[ServedVersion, DynamicBatcher, InferRequest]:
    """Move a request to its sticky version once its parameters are known."""
    version = route.pick_by_parameter(req.parameters)
    if version is None or version == str(sv.version):
        return sv, batcher, req
    sticky, sticky_batcher = repo.resolve(route.name, version)
    m, n = sv.manifest, sticky.manifest
    if m.inputs != n.inputs or m.outputs != n.outputs or m.max_batch_size != n.max_batch_size:
        req = decode_request(
            body, n, header_length=header_length, max_batch_size=sticky_batcher.max_batch_size
        )
    return sticky, sticky_batcher, req


async def repository_index(request: Request) -> Response:
    return _json(_repo(request).index())


async def repository_load(request: Request) -> Response:
    await _repo(request).load_model(request.path_params["model"])
    return _json({})


async def repository_unload(request: Request) -> Response:
    await _repo(request).unload_model(request.path_params["model"])
    return _json({})


_M = "/v2/models/{model}"
_MV = "/v2/models/{model}/versions/{version}"

routes = [
    # Inference first: the router tries routes in order, and these take the traffic.
    Route(_M + "/infer", infer, methods=["POST"]),
    Route(_MV + "/infer", infer, methods=["POST"]),
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/health/live", live, methods=["GET"]),
    Route("/v2/health/ready", ready, methods=["GET"]),
    Route("/v2/models/stats", model_stats, methods=["GET"]),
    Route(_M, model_metadata, methods=["GET"]),
    Route(_MV, model_metadata, methods=["GET"]),
    Route(_M + "/ready", model_ready, methods=["GET"]),
    Route(_MV + "/ready", model_ready, methods=["GET"]),
    Route(_M + "/config", model_config, methods=["GET"]),
    Route(_MV + "/config", model_config, methods=["GET"]),
    Route(_M + "/stats", model_stats, methods=["GET"]),
    Route(_MV + "/stats", model_stats, methods=["GET"]),
    Route("/v2/repository/index", repository_index, methods=["POST"]),
    Route("/v2/repository/models/{model}/load", repository_load, methods=["POST"]),
    Route("/v2/repository/models/{model}/unload", repository_unload, methods=["POST"]),
]
