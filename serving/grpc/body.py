"""A ``ModelInferRequest`` as the inference service reads it, and its ``ModelInferResponse``.

Inputs come in ``raw_input_contents`` (one entry per input, little-endian elements or
length-prefixed BYTES, viewed by numpy in place) or in each input's typed ``contents``;
every one is checked by ``serving.inference.tensors``, as over HTTP. Outputs always go
back in ``raw_output_contents``: that is all ``tritonclient``'s ``as_numpy`` reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np

from model_store.manifest import ModelManifest
from serving.errors import InferenceFailed, InvalidInput
from serving.grpc._proto.grpc_service_pb2 import (
    InferParameter,
    InferTensorContents,
    ModelInferRequest,
    ModelInferResponse,
)
from serving.inference.tensors import (
    InferRequest,
    InputSet,
    SignatureTensor,
    check_output,
    check_output_parameters,
    from_raw,
    from_values,
    serialize_bytes,
    signature,
    wire_array,
)

__all__ = ["GrpcInferBody", "parameters_of"]

_RAW: Final = "raw_input_contents"
_CONTENTS: Final = "contents"

#: The typed ``InferTensorContents`` field of each datatype (FP16 has none: raw only).
_CONTENTS_FIELD: Final = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameters_of(parameters: Mapping[str, InferParameter]) -> dict[str, Any]:
    """V2 parameters as plain values (bool, int, str or float), as the JSON codec gives them."""
    out: dict[str, Any] = {}
    for key, param in parameters.items():
        choice = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, choice) if choice is not None else None
    return out


def _typed_contents(contents: InferTensorContents, spec: SignatureTensor) -> Sequence[Any]:
    field = _CONTENTS_FIELD.get(spec.datatype)
    if field is None:
        raise InvalidInput(
            f"input {spec.name!r}: {spec.datatype} has no typed contents: send it in {_RAW}"
        )
    values: Sequence[Any] = getattr(contents, field)
    return values


class GrpcInferBody:
    """One ``ModelInferRequest``: decoded against a version's signature, answered in kind."""

    __slots__ = ("_request",)

    def __init__(self, request: ModelInferRequest) -> None:
        self._request = request

    async def decode(self, manifest: ModelManifest, max_batch_size: int) -> InferRequest:
        """The request's tensors, checked against ``manifest`` (InvalidInput otherwise)."""
        request = self._request
        sig = signature(manifest)
        entries = request.inputs
        if not entries:
            raise InvalidInput("the request has no inputs")
        raw = request.raw_input_contents
        if raw and len(raw) != len(entries):
            raise InvalidInput(
                f"{_RAW} has {len(raw)} entries for {len(entries)} inputs: "
                "use it for every input or for none"
            )
        inputs = InputSet(sig, max_batch_size)
        for i, entry in enumerate(entries):
            name = entry.name
            spec, shape = inputs.check(name, entry.datatype, list(entry.shape))
            if "shared_memory_region" in entry.parameters:
                raise InvalidInput(f"input {name!r}: shared memory inputs are not supported")
            has_contents = entry.HasField(_CONTENTS)
            if raw:
                if has_contents:
                    raise InvalidInput(f"input {name!r} has both {_CONTENTS} and {_RAW}")
                inputs.add(name, from_raw(memoryview(raw[i]), shape, spec, _RAW))
            elif has_contents:
                values = _typed_contents(entry.contents, spec)
                inputs.add(name, from_values(values, shape, spec, _CONTENTS))
            else:
                raise InvalidInput(f"input {name!r} has neither {_CONTENTS} nor {_RAW}")
        arrays = inputs.finish()
        names: list[str] = []
        for output in request.outputs:
            check_output(sig, output.name, names)
            if output.parameters:
                check_output_parameters(output.name, parameters_of(output.parameters))
            names.append(output.name)
        return InferRequest(
            id=request.id or None,
            inputs=arrays,
            batch_size=inputs.batch_size,
            outputs=names or list(sig.output_names),
            binary_outputs=frozenset(),
            parameters=parameters_of(request.parameters) if request.parameters else {},
        )

    def encode(
        self,
        request: InferRequest,
        outputs: Mapping[str, np.ndarray],
        *,
        model_name: str,
        model_version: str,
        manifest: ModelManifest,
        location: str,
    ) -> ModelInferResponse:
        """The response: every requested output in ``raw_output_contents``, in order."""
        sig = signature(manifest)
        tensors: list[ModelInferResponse.InferOutputTensor] = []
        raw: list[bytes] = []
        for name in request.outputs:
            spec = sig.outputs[name]
            value = outputs.get(name)
            if value is None:
                raise InferenceFailed(f"the model produced no output {name!r}")
            shape: Iterable[int]
            if spec.datatype == "BYTES":
                arr = value if isinstance(value, np.ndarray) else np.asarray(value, np.object_)
                raw.append(serialize_bytes(arr, name))
                shape = arr.shape
            else:
                arr = wire_array(value, spec)
                raw.append(arr.tobytes())
                shape = arr.shape
            tensors.append(
                ModelInferResponse.InferOutputTensor(name=name, datatype=spec.datatype, shape=shape)
            )
        return ModelInferResponse(
            model_name=model_name,
            model_version=model_version,
            id=request.id or "",
            outputs=tensors,
            raw_output_contents=raw,
        )
