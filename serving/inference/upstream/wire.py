"""The V2 codec's other side: a batch as a request to an upstream, its answer back to numpy.

The gateway's own codec (``serving.inference.codec``) reads clients' requests and
writes answers; this module writes requests and reads answers, for the upstream
V2 servers a remote version is computed on. Requests always use the binary tensor
extension (inputs as raw bytes after the JSON header, outputs asked as binary);
answers are read in either form, since not every server honours ``binary_data``.
Answers are checked against the version's signature: an upstream that answers
something else is an upstream fault (502), never a client's.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import orjson
from pydantic import ValidationError

from model_store.manifest import V2_DATATYPES, ModelManifest, TensorSpec
from serving.errors import FermionError

__all__ = [
    "UpstreamFailed",
    "check_metadata",
    "decode_infer_response",
    "encode_infer_request",
    "signature_from_metadata",
]

_HEADER_LENGTH: Final = "inference-header-content-length"
_U32: Final = struct.Struct("<I")


class UpstreamFailed(FermionError):
    """The upstream answered something this gateway cannot use (502)."""

    status_code = 502


def encode_infer_request(
    inputs: Mapping[str, np.ndarray], manifest: ModelManifest, *, binary: bool = True
) -> tuple[bytes, dict[str, str]]:
    """The V2 request body computing ``inputs`` on an upstream, and its headers.

    Every input goes as binary data and every output of ``manifest`` is asked back as
    binary; with ``binary`` False, plain JSON (for servers without the extension).
    """
    if not binary:
        return _json_request(inputs, manifest)
    tensors: list[dict[str, Any]] = []
    buffers: list[bytes | memoryview] = []
    for spec in manifest.inputs:
        value = inputs[spec.name]
        if spec.datatype == "BYTES":
            raw = _serialize_bytes(value)
            buffers.append(raw)
            size = len(raw)
        else:
            arr = np.ascontiguousarray(value, dtype=V2_DATATYPES[spec.datatype].numpy)
            buffers.append(arr.data)
            size = arr.nbytes
        tensors.append(
            {
                "name": spec.name,
                "datatype": spec.datatype,
                "shape": list(value.shape),
                "parameters": {"binary_data_size": size},
            }
        )
    outputs = [{"name": o.name, "parameters": {"binary_data": True}} for o in manifest.outputs]
    head = orjson.dumps({"inputs": tensors, "outputs": outputs})
    body = b"".join([head, *buffers])
    return body, {"content-type": "application/octet-stream", _HEADER_LENGTH: str(len(head))}


def _json_request(
    inputs: Mapping[str, np.ndarray], manifest: ModelManifest
) -> tuple[bytes, dict[str, str]]:
    tensors: list[dict[str, Any]] = []
    for spec in manifest.inputs:
        value = inputs[spec.name]
        if spec.datatype == "BYTES":
            data: Any = [
                v.decode(errors="replace") if isinstance(v, bytes) else str(v)
                for v in value.reshape(-1).tolist()
            ]
        elif spec.datatype == "FP16":
            data = value.astype(np.float32).reshape(-1)  # orjson writes no float16
        else:
            data = np.ascontiguousarray(value).reshape(-1)
        tensors.append(
            {"name": spec.name, "datatype": spec.datatype, "shape": list(value.shape), "data": data}
        )
    body = orjson.dumps(
        {"inputs": tensors, "outputs": [{"name": o.name} for o in manifest.outputs]},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    return body, {"content-type": "application/json"}


def decode_infer_response(
    body: bytes, header_length: str | None, manifest: ModelManifest
) -> dict[str, np.ndarray]:
    """Every output of ``manifest`` from an upstream's V2 answer (UpstreamFailed if unusable)."""
    view = memoryview(body)
    if header_length is None:
        head, binary = view, memoryview(b"")
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise UpstreamFailed(f"upstream sent {_HEADER_LENGTH} {header_length!r}") from None
        if not 0 <= length <= len(view):
            raise UpstreamFailed(f"upstream answer is shorter than its {_HEADER_LENGTH}")
        head, binary = view[:length], view[length:]
    try:
        answer = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        raise UpstreamFailed(f"upstream answer is not V2 JSON: {e}") from None
    entries = answer.get("outputs") if isinstance(answer, dict) else None
    if not isinstance(entries, list):
        raise UpstreamFailed("upstream answer has no 'outputs' list")
    wanted = {o.name: o for o in manifest.outputs}
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        spec = wanted.get(name) if isinstance(name, str) else None
        if spec is None:
            continue  # an output this version does not declare: not ours to pass on
        if entry.get("datatype") != spec.datatype:
            raise UpstreamFailed(
                f"upstream output {spec.name!r} is {entry.get('datatype')!r}, not {spec.datatype}"
            )
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise UpstreamFailed(f"upstream output {spec.name!r} has no valid shape")
        params = entry.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise UpstreamFailed(f"upstream output {spec.name!r}: bad binary_data_size")
            outputs[spec.name] = _from_binary(binary[offset : offset + size], shape, spec)
            offset += size
        else:
            outputs[spec.name] = _from_json(entry.get("data"), shape, spec)
    missing = [name for name in wanted if name not in outputs]
    if missing:
        raise UpstreamFailed(f"upstream answer lacks output(s) {', '.join(map(repr, missing))}")
    return outputs


def signature_from_metadata(
    metadata: Any,
) -> tuple[str, list[TensorSpec], list[TensorSpec]]:
    """(platform, inputs, outputs) of a V2 model metadata answer (UpstreamFailed if invalid)."""
    if not isinstance(metadata, dict):
        raise UpstreamFailed("upstream model metadata is not a JSON object")
    try:
        inputs = [TensorSpec.model_validate(t) for t in metadata.get("inputs") or []]
        outputs = [TensorSpec.model_validate(t) for t in metadata.get("outputs") or []]
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UpstreamFailed(f"upstream model metadata: {where}: {first['msg']}") from None
    if not inputs or not outputs:
        raise UpstreamFailed("upstream model metadata lists no inputs or no outputs")
    platform = metadata.get("platform")
    return (platform if isinstance(platform, str) else ""), inputs, outputs


def check_metadata(manifest: ModelManifest, metadata: Any) -> list[str]:
    """How an upstream's model metadata disagrees with ``manifest`` (empty: it fits).

    Names and datatypes must be equal; each dim must be equal, or dynamic upstream.
    """
    try:
        _, inputs, outputs = signature_from_metadata(metadata)
    except UpstreamFailed as e:
        return [e.message]
    problems: list[str] = []
    for kind, ours, theirs in (
        ("input", manifest.inputs, inputs),
        ("output", manifest.outputs, outputs),
    ):
        upstream = {t.name: t for t in theirs}
        for spec in ours:
            other = upstream.get(spec.name)
            if other is None:
                problems.append(f"upstream has no {kind} {spec.name!r}")
            elif other.datatype != spec.datatype:
                problems.append(
                    f"{kind} {spec.name!r} is {other.datatype} upstream, {spec.datatype} here"
                )
            elif len(other.shape) != len(spec.shape) or any(
                o != -1 and o != s for o, s in zip(other.shape, spec.shape, strict=True)
            ):
                problems.append(
                    f"{kind} {spec.name!r} has shape {other.shape} upstream, {spec.shape} here"
                )
        if kind == "input":
            extra = sorted(set(upstream) - {s.name for s in ours})
            if extra:
                problems.append(f"upstream needs input(s) {extra} this version does not have")
    return problems


def _serialize_bytes(value: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for v in value.reshape(-1).tolist():
        raw = v.encode() if isinstance(v, str) else bytes(v)
        parts.append(_U32.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _from_binary(raw: memoryview, shape: list[int], spec: TensorSpec) -> np.ndarray:
    count = math.prod(shape)
    if spec.datatype == "BYTES":
        out = np.empty(count, dtype=np.object_)
        pos = 0
        for i in range(count):
            if pos + 4 > len(raw):
                raise UpstreamFailed(f"upstream output {spec.name!r}: BYTES data cut short")
            (length,) = _U32.unpack_from(raw, pos)
            pos += 4
            if pos + length > len(raw):
                raise UpstreamFailed(f"upstream output {spec.name!r}: BYTES data cut short")
            out[i] = bytes(raw[pos : pos + length])
            pos += length
        return out.reshape(shape)
    dtype = V2_DATATYPES[spec.datatype].numpy
    if len(raw) != count * dtype.itemsize:
        raise UpstreamFailed(
            f"upstream output {spec.name!r}: {len(raw)} bytes for shape {shape} of {spec.datatype}"
        )
    return np.frombuffer(raw, dtype).reshape(shape)


def _from_json(data: Any, shape: list[int], spec: TensorSpec) -> np.ndarray:
    if not isinstance(data, list):
        raise UpstreamFailed(f"upstream output {spec.name!r} has neither data nor binary data")
    try:
        if spec.datatype == "BYTES":
            flat = np.asarray(data, dtype=np.object_).reshape(-1)
            out = np.empty(flat.size, dtype=np.object_)
            out[:] = [v.encode() if isinstance(v, str) else bytes(v) for v in flat]
            return out.reshape(shape)
        return np.asarray(data, dtype=V2_DATATYPES[spec.datatype].numpy).reshape(shape)
    except (TypeError, ValueError, OverflowError) as e:
        raise UpstreamFailed(f"upstream output {spec.name!r}: data does not fit: {e}") from None
