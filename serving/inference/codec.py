"""The KServe V2 wire codec: HTTP bodies to numpy and back, checked against the model's signature.

JSON tensors and Triton's binary tensor extension (``inference-header-content-length``,
``binary_data_size``, ``binary_data`` outputs) are both supported; ``HttpInferBody`` is
such a body as the inference service reads it (gzip inflated, decoded, answered). Each
named tensor is checked by ``serving.inference.tensors``, as over gRPC. Binary input
tensors are numpy views of the request body (read-only, possibly unaligned): their bytes
are never copied. JSON numbers are converted by the stdlib ``array`` module, which
rejects strings, nulls and out-of-range integers in C, so no Python loop runs per
element except for BYTES tensors.

Clients of the binary extension send the same JSON header with every request (only
the tensors' bytes change), so what a short header decodes to is remembered (``_Plan``)
and the next body with that very header only has its tensors cut out of the binary
part: no JSON parse, no signature checks. A plan is made only from a header that
decoded whole, for the same signature and batch limit, and a body whose binary part
has another length is decoded afresh (to name what is wrong). It saves about a tenth of
a binary request's CPU in the gateway (``bench.gateway_overhead --http``).
"""

from __future__ import annotations

import asyncio
import zlib
from array import array
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson

from model_store.manifest import ModelManifest
from serving.errors import InferenceFailed, InvalidInput, PayloadTooLarge
from serving.inference.json_slices import SLICE_BYTES, cut_arrays, parse_numbers, placeholder_index
from serving.inference.tensors import (
    DATATYPE_TO_NUMPY,
    NUMPY_TO_DATATYPE,
    InferRequest,
    InputSet,
    Signature,
    SignatureTensor,
    check_output,
    check_output_parameters,
    check_shape,
    elements,
    from_raw,
    from_values,
    serialize_bytes,
    signature,
    wire_array,
)

__all__ = [
    "DATATYPE_TO_NUMPY",
    "HEADER_LENGTH",
    "LOCATION_HEADER",
    "NUMPY_TO_DATATYPE",
    "SLICE_BYTES",
    "VERSION_HEADER",
    "HttpInferBody",
    "InferRequest",
    "decode_request",
    "decode_request_async",
    "encode_error",
    "encode_response",
]

#: The HTTP header giving the length of the JSON part of a binary-extension body.
HEADER_LENGTH: Final = "inference-header-content-length"
#: The response header naming the version that answered.
VERSION_HEADER: Final = "fermion-model-version"
#: The response header naming where the answer was computed: local, ray or remote.
LOCATION_HEADER: Final = "fermion-location"

_JSON_HEADERS: Final = {"content-type": "application/json"}
_BINARY_CONTENT_TYPE: Final = "application/octet-stream"
_OPT_NUMPY: Final = orjson.OPT_SERIALIZE_NUMPY
_NO_BINARY: Final = memoryview(b"")
_BINARY_FIELD: Final = "binary_data_size"
_JSON_FIELD: Final = "'data'"


# --------------------------------------------------------------------------- decode


def decode_request(
    body: bytes | bytearray | memoryview,
    manifest: ModelManifest,
    *,
    header_length: int | None = None,
    max_batch_size: int | None = None,
) -> InferRequest:
    """Decode a V2 inference request body and validate it against ``manifest``.

    ``header_length`` is the ``inference-header-content-length`` header, when sent:
    the JSON header is then ``body[:header_length]`` and binary tensors follow it.
    ``max_batch_size`` overrides the manifest's limit on dim 0 for batching models.
    Raises ``InvalidInput`` for anything malformed or not matching the signature.
    """
    header, binary = _split(body, header_length)
    sig = signature(manifest)
    if binary is not _NO_BINARY and len(header) <= _PLAN_BYTES:
        return _decode_binary(header, binary, sig, max_batch_size)
    return _decode(_loads(header), header, binary, sig, max_batch_size)


async def decode_request_async(
    body: bytes | bytearray | memoryview,
    manifest: ModelManifest,
    *,
    header_length: int | None = None,
    max_batch_size: int | None = None,
) -> InferRequest:
    """``decode_request`` for a body of any size, never holding the event loop long.

    A JSON part over ``SLICE_BYTES`` has its long numeric arrays cut out and converted
    a slice at a time (``json_slices``); a long array anywhere but in an input's
    ``data`` is refused.
    """
    header, binary = _split(body, header_length)
    sig = signature(manifest)
    if binary is not _NO_BINARY and len(header) <= _PLAN_BYTES:
        return _decode_binary(header, binary, sig, max_batch_size)
    if len(header) <= SLICE_BYTES:
        return _decode(_loads(header), header, binary, sig, max_batch_size)
    skeleton, sliced = await cut_arrays(header)
    req = _loads(skeleton)
    used: set[int] = set()
    entries = req.get("inputs") if isinstance(req, dict) else None
    for entry in entries if isinstance(entries, list) else ():
        index = placeholder_index(entry.get("data")) if isinstance(entry, dict) else None
        if index is None or index >= len(sliced):
            continue
        spec = sig.inputs.get(entry.get("name"))
        if spec is None or entry.get("datatype") != spec.datatype or spec.datatype == "BYTES":
            continue  # _decode names what is wrong
        shape = check_shape(entry.get("shape"), spec)
        values = await parse_numbers(sliced[index], shape, spec.code, spec.name, spec.datatype)
        entry["data"] = _Decoded(values)
        used.add(index)
    if len(used) != len(sliced):
        raise InvalidInput(
            "request body has a long array of numbers outside the inputs' 'data' "
            "(unknown fields are not accepted in large bodies)"
        )
    return _decode(req, skeleton, binary, sig, max_batch_size)


@dataclass(frozen=True, slots=True)
class _Decoded:
    """An input's numbers, already converted (``decode_request_async``)."""

    values: array[Any]


#: An input cut from the binary part: its name, signature, shape and byte range.
_Slot = tuple[str, SignatureTensor, tuple[int, ...], int, int]
#: Headers up to this long have their decoding remembered (a V2 header is ~200 bytes).
_PLAN_BYTES: Final = 4096
#: Plans kept at most; past it all are forgotten (a client varying its header on
#: purpose only makes its own requests decode in full).
_MAX_PLANS: Final = 512


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a binary body's JSON header decoded to, but for the tensors' bytes."""

    sig: Signature
    id: str | None
    slots: tuple[_Slot, ...]
    #: Bytes of binary data the inputs take, all of it.
    size: int
    batch_size: int
    outputs: tuple[str, ...]
    binary_outputs: frozenset[str]
    parameters: dict[str, Any]

    def replay(self, binary: memoryview) -> InferRequest:
        """The request of a body with this header and ``binary`` (``size`` bytes)."""
        inputs = {
            name: from_raw(binary[start:end], shape, spec, _BINARY_FIELD)
            for name, spec, shape, start, end in self.slots
        }
        return InferRequest(
            id=self.id,
            inputs=inputs,
            batch_size=self.batch_size,
            outputs=list(self.outputs),
            binary_outputs=self.binary_outputs,
            parameters=dict(self.parameters),
        )


_SCALARS: Final = frozenset({str, int, float, bool, type(None)})
#: Plans by (header, signature's id, batch limit); a plan holds its signature, so an
#: id is never reused while its plans are kept.
_PLANS: dict[tuple[bytes, int, int | None], _Plan] = {}


def _decode_binary(
    header: memoryview, binary: memoryview, sig: Signature, max_batch_size: int | None
) -> InferRequest:
    """``_decode`` of a body with a binary part and a short header, through the plan of
    its header."""
    key = (header.tobytes(), id(sig), max_batch_size)
    plan = _PLANS.get(key)
    if plan is not None and plan.sig is sig and plan.size == len(binary):
        return plan.replay(binary)
    slots: list[_Slot] = []
    req = _decode(_loads(header), header, binary, sig, max_batch_size, slots)
    # Every input from the binary part, and parameters a later request cannot change in
    # place (each gets its own copy of the dict): then the header's decoding is its plan.
    if len(slots) == len(req.inputs) and all(type(v) in _SCALARS for v in req.parameters.values()):
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = _Plan(
            sig=sig,
            id=req.id,
            slots=tuple(slots),
            size=len(binary),
            batch_size=req.batch_size,
            outputs=tuple(req.outputs),
            binary_outputs=req.binary_outputs,
            parameters=dict(req.parameters),
        )
    return req


def _split(
    body: bytes | bytearray | memoryview, header_length: int | None
) -> tuple[Any, memoryview]:
    """The JSON part and the binary part of a body."""
    if header_length is None:
        return body, _NO_BINARY
    view = memoryview(body)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if header_length < 0 or header_length > len(view):
        raise InvalidInput(
            f"truncated body: {HEADER_LENGTH} is {header_length} but the body has {len(view)} bytes"
        )
    return view[:header_length], view[header_length:]


def _loads(header: bytes | bytearray | memoryview) -> Any:
    try:
        return orjson.loads(header)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"request body is not valid JSON: {e}") from None


def _decode(
    req: Any,
    text: bytes | bytearray | memoryview,
    binary: memoryview,
    sig: Signature,
    max_batch_size: int | None,
    slots: list[_Slot] | None = None,
) -> InferRequest:
    """The request parsed as ``req`` from JSON ``text``, checked against ``sig``;
    ``slots`` (when given) gets each input taken from the binary part."""
    header_length = None if binary is _NO_BINARY else len(text)
    if not isinstance(req, dict):
        raise InvalidInput("request body must be a JSON object")
    # JSON true/false can only be in the body where its text says so.
    has_booleans = _has_booleans(text)

    request_id = req.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("request 'id' must be a string")
    parameters = req.get("parameters")
    binary_default = False
    if parameters is None:
        parameters = {}
    elif not isinstance(parameters, dict):
        raise InvalidInput("request 'parameters' must be a JSON object")
    elif "binary_data_output" in parameters:
        parameters = dict(parameters)
        binary_default = parameters.pop("binary_data_output")
        if not isinstance(binary_default, bool):
            raise InvalidInput("request parameter 'binary_data_output' must be a boolean")

    entries = req.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise InvalidInput("request 'inputs' must be a non-empty list")

    inputs = InputSet(sig, max_batch_size)
    offset = 0
    last_binary = ""
    for entry in entries:
        if not isinstance(entry, dict):
            raise InvalidInput("each of request 'inputs' must be a JSON object")
        name = entry.get("name")
        if not isinstance(name, str):
            raise InvalidInput("each of request 'inputs' needs a string 'name'")
        spec, shape = inputs.check(name, entry.get("datatype"), entry.get("shape"))

        params = entry.get("parameters")
        size: Any = None
        if params is not None:
            if not isinstance(params, dict):
                raise InvalidInput(f"input {name!r}: 'parameters' must be a JSON object")
            if "shared_memory_region" in params:
                raise InvalidInput(f"input {name!r}: shared memory inputs are not supported")
            size = params.get("binary_data_size")
        data = entry.get("data")
        if size is not None:
            if data is not None:
                raise InvalidInput(f"input {name!r} has both 'data' and 'binary_data_size'")
            if type(size) is not int or size < 0:
                raise InvalidInput(
                    f"input {name!r}: binary_data_size must be a non-negative integer"
                )
            end = offset + size
            if end > len(binary):
                if header_length is None:
                    raise InvalidInput(
                        f"input {name!r} has binary_data_size but the request has no "
                        f"binary part ({HEADER_LENGTH} header missing)"
                    )
                raise InvalidInput(
                    f"input {name!r}: binary_data_size is {size} but only "
                    f"{len(binary) - offset} bytes of binary data are left"
                )
            inputs.add(name, from_raw(binary[offset:end], shape, spec, _BINARY_FIELD))
            if slots is not None:
                slots.append((name, spec, shape, offset, end))
            offset, last_binary = end, name
        elif data is None:
            raise InvalidInput(f"input {name!r} has neither 'data' nor 'binary_data_size'")
        elif isinstance(data, _Decoded):
            inputs.add(name, from_values(data.values, shape, spec, _JSON_FIELD))
        else:
            if not isinstance(data, list):
                raise InvalidInput(f"input {name!r}: 'data' must be a list")
            if data and isinstance(data[0], list):
                data = _flatten(data, shape, name)
            inputs.add(
                name, from_values(data, shape, spec, _JSON_FIELD, refuse_booleans=has_booleans)
            )

    if offset != len(binary):
        where = f"after binary input {last_binary!r}" if last_binary else "after the JSON header"
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data {where} are not accounted for by "
            "any input's binary_data_size"
        )
    arrays = inputs.finish()
    outputs, binary_outputs = _requested_outputs(req.get("outputs"), sig, binary_default)
    return InferRequest(
        id=request_id,
        inputs=arrays,
        batch_size=inputs.batch_size,
        outputs=outputs,
        binary_outputs=binary_outputs,
        parameters=parameters,
    )


#: (letter, word, its index): a JSON number never holds a ``u`` or an ``l``, so only
#: keys and strings (few in a V2 body) are looked at, each with memchr. (``b"true" in``
#: costs as much as parsing the body: digits defeat its skip table.)
_BOOLEAN_LETTERS = ((b"u", b"true", 2), (b"l", b"false", 2))
#: More places than this to look at: say yes, and let the values be checked one by one.
_BOOLEAN_LOOKS = 32


def _has_booleans(text: bytes | bytearray | memoryview) -> bool:
    """False only when the JSON ``text`` holds no ``true`` or ``false`` (True may be wrong)."""
    raw = text if isinstance(text, bytes) else bytes(text)
    for letter, word, at in _BOOLEAN_LETTERS:
        looks = 0
        i = raw.find(letter, at)
        while i >= 0:
            if raw.startswith(word, i - at):
                return True
            looks += 1
            if looks > _BOOLEAN_LOOKS:
                return True
            i = raw.find(letter, i + 1)
    return False


def _flatten(data: list[Any], shape: tuple[int, ...], name: str) -> list[Any]:
    """Row-major elements of nested ``data``, which must nest exactly as ``shape``."""
    rows: list[Any] = [data]
    for dim in shape:
        level: list[Any] = []
        for row in rows:
            if not isinstance(row, list) or len(row) != dim:
                raise InvalidInput(
                    f"input {name!r}: nested 'data' does not match shape {list(shape)}"
                )
            level.extend(row)
        rows = level
    return rows


def _requested_outputs(
    requested: Any, sig: Signature, binary_default: bool
) -> tuple[list[str], frozenset[str]]:
    if requested is None or requested == []:
        names = list(sig.output_names)
        return names, sig.all_outputs if binary_default else frozenset()
    if not isinstance(requested, list):
        raise InvalidInput("request 'outputs' must be a list")
    names = []
    binary = []
    for entry in requested:
        if not isinstance(entry, dict) or not isinstance(name := entry.get("name"), str):
            raise InvalidInput("each of request 'outputs' must be an object with a string 'name'")
        check_output(sig, name, names)
        params = entry.get("parameters")
        as_binary = binary_default
        if params is not None:
            if not isinstance(params, dict):
                raise InvalidInput(f"output {name!r}: 'parameters' must be a JSON object")
            check_output_parameters(name, params)
            flag = params.get("binary_data", binary_default)
            if not isinstance(flag, bool):
                raise InvalidInput(f"output {name!r}: 'binary_data' must be a boolean")
            as_binary = flag
        names.append(name)
        if as_binary:
            binary.append(name)
    return names, frozenset(binary)


# --------------------------------------------------------------------------- encode


def encode_response(
    request: InferRequest,
    outputs: Mapping[str, np.ndarray],
    *,
    model_name: str,
    model_version: str,
    manifest: ModelManifest,
) -> tuple[bytes, dict[str, str]]:
    """Encode the model's ``outputs`` for ``request`` as a V2 response.

    Returns the body and its headers: ``content-type``, and
    ``inference-header-content-length`` when any output goes back as binary. Outputs
    are cast to the manifest's datatype. Raises ``InferenceFailed`` when the model
    did not produce a requested output, and ``InvalidInput`` when BYTES that are not
    UTF-8 were requested as JSON.
    """
    sig = signature(manifest)
    tensors: list[dict[str, Any]] = []
    buffers: list[Any] = []
    binary_outputs = request.binary_outputs
    for name in request.outputs:
        spec = sig.outputs.get(name)
        value = outputs.get(name)
        if spec is None or value is None:
            raise InferenceFailed(f"the model produced no output {name!r}")
        if spec.datatype == "BYTES":
            arr = value if isinstance(value, np.ndarray) else np.asarray(value, dtype=np.object_)
            if name in binary_outputs:
                raw = serialize_bytes(arr, name)
                buffers.append(raw)
                tensors.append(_binary_entry(name, spec.datatype, arr.shape, len(raw)))
            else:
                tensors.append(
                    _json_entry(name, spec.datatype, arr.shape, _json_strings(arr, name))
                )
            continue
        arr = wire_array(value, spec)
        if name in binary_outputs:
            buffers.append(arr)
            tensors.append(_binary_entry(name, spec.datatype, arr.shape, arr.nbytes))
        else:
            tensors.append(_json_entry(name, spec.datatype, arr.shape, arr.reshape(-1)))
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = tensors
    head = orjson.dumps(response, option=_OPT_NUMPY)
    if not buffers:
        return head, dict(_JSON_HEADERS)
    return b"".join([head, *buffers]), {
        "content-type": _BINARY_CONTENT_TYPE,
        HEADER_LENGTH: str(len(head)),
    }


def encode_error(message: str) -> bytes:
    """The V2 error body ``{"error": message}``."""
    return orjson.dumps({"error": message})


def _json_entry(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _binary_entry(name: str, datatype: str, shape: tuple[int, ...], size: int) -> dict[str, Any]:
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": size},
    }


def _json_strings(arr: np.ndarray, name: str) -> list[str]:
    out: list[str] = []
    for v in elements(arr):
        if isinstance(v, bytes):
            try:
                v = v.decode()
            except UnicodeDecodeError:
                raise InvalidInput(
                    f"output {name!r} holds bytes that are not UTF-8: request it with binary_data"
                ) from None
        elif not isinstance(v, str):
            raise InferenceFailed(f"output {name!r} holds a {type(v).__name__}, not bytes or str")
        out.append(v)
    return out


# --------------------------------------------------------------------------- HTTP body


class HttpInferBody:
    """A V2 HTTP request body as the inference service reads it.

    Read once, on the first ``decode``; inflated when ``content-encoding: gzip`` (413
    over ``max_bytes`` inflated); split at ``inference-header-content-length`` when sent.
    ``encode`` answers with the body and its headers, the served version among them.
    """

    __slots__ = ("_body", "_headers", "_max_bytes", "_read")

    def __init__(
        self, read: Callable[[], Awaitable[bytes]], headers: Mapping[str, str], max_bytes: int
    ) -> None:
        self._read = read
        self._headers = headers
        self._max_bytes = max_bytes
        self._body: bytes | bytearray | None = None

    async def decode(self, manifest: ModelManifest, max_batch_size: int) -> InferRequest:
        """The body decoded against ``manifest`` (read on the first call)."""
        body = self._body
        if body is None:
            body = self._body = await _inflate(await self._read(), self._headers, self._max_bytes)
        return await decode_request_async(
            body,
            manifest,
            header_length=_header_length(self._headers),
            max_batch_size=max_batch_size,
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
    ) -> tuple[bytes, dict[str, str]]:
        """The response body and headers (``fermion-model-version`` and ``fermion-location``)."""
        content, headers = encode_response(
            request, outputs, model_name=model_name, model_version=model_version, manifest=manifest
        )
        headers[VERSION_HEADER] = model_version
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


#: Content-Encoding -> zlib window bits: gzip, and deflate as HTTP means it (zlib format).
_WBITS = {"gzip": 31, "deflate": 15}


async def _inflate(body: bytes, headers: Mapping[str, str], limit: int) -> bytes | bytearray:
    """The body as sent, or inflated when gzip- or deflate-encoded (413 over ``limit`` bytes).

    Inflated a slice at a time into one buffer, the loop running in between; a body of
    more than one member (or data after its end) is refused.
    """
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise InvalidInput(
            f"unsupported Content-Encoding {encoding!r} (use gzip, deflate or identity)"
        )
    d = zlib.decompressobj(wbits=wbits)
    # Grown a slice at a time: a large buffer grows in place (mremap), never copied whole.
    out = bytearray()
    data = body
    try:
        while True:
            part = d.decompress(data, _INFLATE_SLICE)
            if len(out) + len(part) > limit:
                raise PayloadTooLarge(f"decompressed request body over the limit of {limit} bytes")
            out += part
            data = d.unconsumed_tail
            if d.eof or not data:
                break
            await asyncio.sleep(0)
    except zlib.error as e:
        raise InvalidInput(f"invalid {encoding} body: {e}") from None
    if not d.eof:
        raise InvalidInput(f"invalid {encoding} body: truncated")
    if d.unused_data:
        raise InvalidInput(f"invalid {encoding} body: data after the end of its {encoding} member")
    return out


#: Bytes inflated per step: about a millisecond of work.
_INFLATE_SLICE = 1 << 20
