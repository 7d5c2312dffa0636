"""KServe V2 REST routes: health, metadata, config, statistics, inference, repository."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from model_store.manifest import V2_DATATYPES
from serving.errors import ModelNotFound
from serving.http.admin import LoopbackOnlyMiddleware
from serving.http.responses import json_response as _json
from serving.inference.repository import ModelRepository, ServedVersion, VersionState
from serving.observability.host import HostSiblings, merge_stats
from serving.protocol import SERVER_NAME, SERVER_VERSION

__all__ = ["SERVER_NAME", "SERVER_VERSION", "repository_mount", "routes", "stats_document"]

_EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics"]


def _repo(request: Request) -> ModelRepository:
    repo: ModelRepository = request.app.state.repository
    return repo


async def server_metadata(request: Request) -> Response:
    return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": _EXTENSIONS})


async def live(request: Request) -> Response:
    return _json({"live": True})


async def ready(request: Request) -> Response:
    """``{"ready": ...}``, with the reason and each model or version that is not ready."""
    readiness = _repo(request).readiness()
    if request.app.state.drain.draining:
        readiness = readiness.draining()
    body: dict[str, Any] = {"ready": readiness.ready}
    if readiness.problems:
        body["reason"] = readiness.reason()
        body["not_ready"] = [
            {
                "model": p.model,
                "version": None if p.version is None else str(p.version),
                "state": p.state,
                "reason": p.reason,
            }
            for p in readiness.problems
        ]
    return _json(body, 200 if readiness.ready else 503)


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
            "data_type": V2_DATATYPES[t.datatype].triton,
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


def stats_document(repo: ModelRepository, name: str | None, version: str | None) -> dict[str, Any]:
    """The statistics extension's answer for every model, one model or one version."""
    if name is None:
        served = [sv for n in repo.configured_models() for sv in _served(repo, n)]
    elif version is not None:
        served = [repo.get(name, version)]
    else:
        served = list(repo.versions(name).values())
    return {"model_stats": [_version_stats(sv) for sv in served]}


async def model_stats(request: Request) -> Response:
    name = request.path_params.get("model")
    version = request.path_params.get("version")
    document = stats_document(_repo(request), name, version)
    siblings: HostSiblings | None = getattr(request.app.state, "siblings", None)
    if siblings is not None:  # --workers: the whole host's figures
        answers = await siblings.ask("stats", name or "-", version or "-")
        document = merge_stats([document, *(orjson.loads(a) for a in answers if a)])
    return _json(document)


def _served(repo: ModelRepository, name: str) -> list[ServedVersion]:
    try:
        return list(repo.versions(name).values())
    except ModelNotFound:
        return []


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
    # Inference (``{_M}/infer``, ``{_MV}/infer``) never reaches the router: the app
    # hands it to ``serving.http.infer_path.InferPath``.
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
]


def repository_mount(*, loopback_only: bool) -> Mount:
    """The repository extension under ``/v2/repository``: it loads and unloads models, so
    it follows the admin API's rule (loopback clients only with auth off, else ``admin``)."""
    middleware = (
        [Middleware(LoopbackOnlyMiddleware, what="the repository API")] if loopback_only else []
    )
    repository_routes = [
        Route("/index", repository_index, methods=["POST"]),
        Route("/models/{model}/load", repository_load, methods=["POST"]),
        Route("/models/{model}/unload", repository_unload, methods=["POST"]),
    ]
    return Mount("/v2/repository", routes=repository_routes, middleware=middleware)
