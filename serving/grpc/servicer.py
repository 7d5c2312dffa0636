"""``inference.GRPCInferenceService`` (Triton's, a superset of KServe's) over the repository
and the inference service that HTTP uses.

Every method goes through the ``CallGate`` (auth, rate limits, tracing, error status) with
the scope its HTTP twin needs: health open, metadata, config and statistics ``read``, the
repository ``admin``, inference ``infer:<model>``. Shared memory, trace and log settings
and ``ModelStreamInfer`` answer UNIMPLEMENTED.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, NoReturn

import grpc

from model_store.manifest import V2_DATATYPES, TensorSpec
from serving.auth.scopes import ADMIN, INFER, OPEN, READ
from serving.errors import ModelNotFound
from serving.grpc._proto import grpc_service_pb2 as pb
from serving.grpc._proto import model_config_pb2 as mc
from serving.grpc._proto.grpc_service_pb2_grpc import GRPCInferenceServiceServicer
from serving.grpc.body import GrpcInferBody
from serving.grpc.gate import Call, CallGate, Context
from serving.inference.codec import LOCATION_HEADER, VERSION_HEADER
from serving.inference.limits import TIMEOUT_HEADER
from serving.inference.repository import ModelRepository, ServedVersion, VersionState
from serving.inference.service import InferCall, InferenceService
from serving.protocol import SERVER_NAME, SERVER_VERSION

__all__ = ["EXTENSIONS", "InferenceServicer"]

#: The V2 extensions this server offers (as ``GET /v2`` reports them).
EXTENSIONS: Final = ("binary_tensor_data", "model_repository", "statistics")


def _tensors(specs: list[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
        for t in specs
    ]


def _duration(d: Any) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _statistics(sv: ServedVersion) -> pb.ModelStatistics:
    b = sv.batcher
    if b is None:
        return pb.ModelStatistics(name=sv.name, version=str(sv.version))
    s = b.stats
    return pb.ModelStatistics(
        name=sv.name,
        version=str(sv.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_infer=_duration(s.compute),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(d))
            for size, d in sorted(s.batch_sizes.items())
        ],
    )


def _deadline(call: Call) -> None:
    """Make the call's gRPC deadline the request's (the shorter of it and the header's)."""
    remaining = call.context.time_remaining()
    if remaining is None:
        return
    ms = max(remaining * 1e3, 1e-3)
    sent = call.metadata.get(TIMEOUT_HEADER)
    if sent is not None:
        try:
            ms = min(ms, float(sent))
        except ValueError:
            return  # the service refuses the header with its own message
    call.metadata[TIMEOUT_HEADER] = repr(ms)


class InferenceServicer(GRPCInferenceServiceServicer):
    """The V2 gRPC methods, each a thin caller of the repository or the inference service."""

    def __init__(
        self,
        *,
        service: InferenceService[Any],
        repository: ModelRepository,
        gate: CallGate,
        backend: str,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self._service = service
        self._repository = repository
        self._gate = gate
        self._backend = backend
        #: True while the gateway drains before it stops (ServerReady answers false).
        self._draining = draining

    # ------------------------------------------------------------------ health, metadata

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> Any:
        return await self._gate.run("ServerLive", OPEN, "", self._live, request, context)

    async def _live(self, request: pb.ServerLiveRequest, call: Call) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> Any:
        return await self._gate.run("ServerReady", OPEN, "", self._ready, request, context)

    async def _ready(self, request: pb.ServerReadyRequest, call: Call) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._repository.ready and not self._draining())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> Any:
        return await self._gate.run("ModelReady", READ, "", self._model_ready, request, context)

    async def _model_ready(
        self, request: pb.ModelReadyRequest, call: Call
    ) -> pb.ModelReadyResponse:
        sv = self._repository.get(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=sv.state is VersionState.READY)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> Any:
        return await self._gate.run("ServerMetadata", READ, "", self._server, request, context)

    async def _server(
        self, request: pb.ServerMetadataRequest, call: Call
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> Any:
        return await self._gate.run("ModelMetadata", READ, "", self._metadata, request, context)

    async def _metadata(
        self, request: pb.ModelMetadataRequest, call: Call
    ) -> pb.ModelMetadataResponse:
        repo = self._repository
        m = repo.get(request.name, request.version or None).manifest
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=[str(v) for v in sorted(repo.versions(request.name))],
            platform=m.platform,
            inputs=_tensors(m.inputs),
            outputs=_tensors(m.outputs),
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> Any:
        return await self._gate.run("ModelConfig", READ, "", self._config, request, context)

    async def _config(self, request: pb.ModelConfigRequest, call: Call) -> pb.ModelConfigResponse:
        sv = self._repository.get(request.name, request.version or None)
        m, b = sv.manifest, sv.batcher
        batched = m.max_batch_size > 0

        def dims(t: TensorSpec) -> list[int]:
            return t.shape[1:] if batched else t.shape

        def data_type(t: TensorSpec) -> str:
            return V2_DATATYPES[t.datatype].triton

        parameters = {"state": mc.ModelParameter(string_value=sv.state.value)}
        if sv.reason:
            parameters["reason"] = mc.ModelParameter(string_value=sv.reason)
        if sv.replica.get("target"):
            parameters["target"] = mc.ModelParameter(string_value=str(sv.replica["target"]))
        config = mc.ModelConfig(
            name=m.name,
            platform=m.platform,
            backend=self._backend,
            max_batch_size=b.max_batch_size if b and batched else m.max_batch_size,
            input=[
                mc.ModelInput(name=t.name, data_type=data_type(t), dims=dims(t)) for t in m.inputs
            ],
            output=[
                mc.ModelOutput(name=t.name, data_type=data_type(t), dims=dims(t)) for t in m.outputs
            ],
            parameters=parameters,
        )
        if b is not None:
            config.dynamic_batching.CopyFrom(
                mc.ModelDynamicBatching(
                    max_queue_delay_microseconds=int(b.max_queue_delay_s * 1e6),
                    default_queue_policy=mc.ModelQueuePolicy(max_queue_size=b.max_queue_size),
                )
            )
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> Any:
        return await self._gate.run("ModelStatistics", READ, "", self._stats, request, context)

    async def _stats(
        self, request: pb.ModelStatisticsRequest, call: Call
    ) -> pb.ModelStatisticsResponse:
        repo = self._repository
        served: list[ServedVersion]
        if not request.name:
            served = []
            for name in repo.configured_models():
                with contextlib.suppress(ModelNotFound):
                    served.extend(repo.versions(name).values())
        elif request.version:
            served = [repo.get(request.name, request.version)]
        else:
            served = list(repo.versions(request.name).values())
        return pb.ModelStatisticsResponse(model_stats=[_statistics(sv) for sv in served])

    # ------------------------------------------------------------------ repository

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> Any:
        return await self._gate.run("RepositoryIndex", ADMIN, "", self._index, request, context)

    async def _index(
        self, request: pb.RepositoryIndexRequest, call: Call
    ) -> pb.RepositoryIndexResponse:
        rows = self._repository.index()
        if request.ready:
            rows = [r for r in rows if r["state"] == VersionState.READY.value]
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> Any:
        return await self._gate.run("RepositoryModelLoad", ADMIN, "", self._load, request, context)

    async def _load(
        self, request: pb.RepositoryModelLoadRequest, call: Call
    ) -> pb.RepositoryModelLoadResponse:
        await self._repository.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> Any:
        return await self._gate.run(
            "RepositoryModelUnload", ADMIN, "", self._unload, request, context
        )

    async def _unload(
        self, request: pb.RepositoryModelUnloadRequest, call: Call
    ) -> pb.RepositoryModelUnloadResponse:
        await self._repository.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ------------------------------------------------------------------ inference

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> Any:
        return await self._gate.run(
            "ModelInfer", INFER, request.model_name, self._infer, request, context
        )

    async def _infer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        _deadline(call)
        infer = InferCall(
            model=request.model_name,
            version=request.model_version or None,
            headers=call.metadata,
            body=GrpcInferBody(request),
            started_ns=call.started_ns,
            state={},
        )
        response: pb.ModelInferResponse = await self._service.infer(infer)
        call.trailers.append((VERSION_HEADER, response.model_version))
        call.trailers.append((LOCATION_HEADER, infer.state["location"]))
        return response

    # ------------------------------------------------------------------ not offered

    async def _unimplemented(self, context: Context, what: str) -> NoReturn:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"Fermion does not offer {what} over gRPC (see the README's supported RPCs)",
        )
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> Any:
        await self._unimplemented(context, "ModelStreamInfer (streaming inference)")

    async def SystemSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        await self._unimplemented(context, "system shared memory")

    async def SystemSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        await self._unimplemented(context, "system shared memory")

    async def SystemSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        await self._unimplemented(context, "system shared memory")

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        await self._unimplemented(context, "CUDA shared memory")

    async def CudaSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        await self._unimplemented(context, "CUDA shared memory")

    async def CudaSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        await self._unimplemented(context, "CUDA shared memory")

    async def TraceSetting(self, request: Any, context: Context) -> Any:
        await self._unimplemented(context, "trace settings (configure tracing: in fermion.yaml)")

    async def LogSettings(self, request: Any, context: Context) -> Any:
        await self._unimplemented(context, "log settings (server.log_level in fermion.yaml)")
