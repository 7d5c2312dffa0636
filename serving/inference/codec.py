"""The KServe V2 wire codec: HTTP bodies to numpy and back, checked against the model's signature.

JSON tensors and Triton's binary tensor extension (``inference-header-content-length``,
``binary_data_size``, ``binary_data`` outputs) are both supported. Binary input tensors
are numpy views of the request body (read-only, possibly unaligned): their bytes are
never copied. JSON numbers are converted by the stdlib ``array`` module, which rejects
strings, nulls and out-of-range integers in C, so no Python loop runs per element
except for BYTES tensors.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson

from model_store.manifest import V2_DATATYPES, ModelManifest, TensorSpec
from serving.errors import InferenceFailed, InvalidInput
from serving.inference.json_slices import SLICE_BYTES, cut_arrays, parse_numbers, placeholder_index

__all__ = [
    "DATATYPE_TO_NUMPY",
    "HEADER_LENGTH",
    "NUMPY_TO_DATATYPE",
    "SLICE_BYTES",
    "InferRequest",
    "decode_request",
    "decode_request_async",
    "encode_error",
    "encode_response",
]

#: The numpy dtype of each V2 datatype (little-endian, as on the wire): a view of
#: ``model_store.manifest.V2_DATATYPES``.
DATATYPE_TO_NUMPY: Final[dict[str, np.dtype[Any]]] = {
    name: t.numpy for name, t in V2_DATATYPES.items()
}

#: The V2 datatype of each numpy dtype (object arrays are BYTES).
NUMPY_TO_DATATYPE: Final[dict[np.dtype[Any], str]] = {
    dtype: name for name, dtype in DATATYPE_TO_NUMPY.items()
}

#: The HTTP header giving the length of the JSON part of a binary-extension body.
HEADER_LENGTH: Final = "inference-header-content-length"

_JSON_HEADERS: Final = {"content-type": "application/json"}
_BINARY_CONTENT_TYPE: Final = "application/octet-stream"
_OPT_NUMPY: Final = orjson.OPT_SERIALIZE_NUMPY
_U32: Final = struct.Struct("<I")
_NO_BINARY: Final = memoryview(b"")

# The stdlib array type code that converts (and range-checks) JSON numbers of each
# datatype. FP16 goes through doubles; BOOL through bytes checked to be 0 or 1.
_ARRAY_CODES: Final = {
    "BOOL": "B",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "d",
    "FP32": "f",
    "FP64": "d",
}
assert all(array(code).itemsize == np.dtype(code).itemsize for code in _ARRAY_CODES.values())
_NATIVE_IS_LITTLE: Final = sys.byteorder == "little"


@dataclass(slots=True)
class InferRequest:
    """A decoded, validated inference request."""

    id: str | None
    #: Every manifest input, shaped and of the manifest's dtype.
    inputs: dict[str, np.ndarray]
    #: Rows in dim 0 (1 when the model does not batch).
    batch_size: int
    #: Requested output names in order; all manifest outputs when none were requested.
    outputs: list[str]
    #: The outputs to send back as binary tensors.
    binary_outputs: frozenset[str]
    #: Request-level parameters, less ``binary_data_output``.
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Tensor:
    name: str
    datatype: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    code: str  # stdlib array type code for JSON numbers ("" for BYTES)
    code_dtype: np.dtype[Any]  # the native numpy dtype of that code


@dataclass(frozen=True, slots=True)
class _Signature:
    inputs: dict[str, _Tensor]
    outputs: dict[str, _Tensor]
    output_names: tuple[str, ...]
    all_outputs: frozenset[str]
    batched: bool
    max_batch_size: int


def _tensor(spec: TensorSpec) -> _Tensor:
    return _Tensor(
        name=spec.name,
        datatype=spec.datatype,
        dtype=DATATYPE_TO_NUMPY[spec.datatype],
        shape=tuple(spec.shape),
        code=_ARRAY_CODES.get(spec.datatype, ""),
        code_dtype=np.dtype(_ARRAY_CODES.get(spec.datatype, "O")),
    )


# Compiled signatures by manifest identity; the entry keeps its manifest alive so an
# id is never reused while cached.
_SIGNATURES: dict[int, tuple[ModelManifest, _Signature]] = {}
_MAX_SIGNATURES: Final = 256


def _signature(manifest: ModelManifest) -> _Signature:
    cached = _SIGNATURES.get(id(manifest))
    if cached is not None and cached[0] is manifest:
        return cached[1]
    names = tuple(o.name for o in manifest.outputs)
    sig = _Signature(
        inputs={i.name: _tensor(i) for i in manifest.inputs},
        outputs={o.name: _tensor(o) for o in manifest.outputs},
        output_names=names,
        all_outputs=frozenset(names),
        batched=manifest.max_batch_size > 0,
        max_batch_size=manifest.max_batch_size,
    )
    if len(_SIGNATURES) >= _MAX_SIGNATURES:
        _SIGNATURES.clear()
    _SIGNATURES[id(manifest)] = (manifest, sig)
    return sig


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
    return _decode(_loads(header), header, binary, _signature(manifest), max_batch_size)


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
    sig = _signature(manifest)
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
        shape = _check_shape(entry.get("shape"), spec)
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


def _loads(header: bytes | memoryview) -> Any:
    try:
        return orjson.loads(header)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"request body is not valid JSON: {e}") from None


def _decode(
    req: Any,
    text: bytes | memoryview,
    binary: memoryview,
    sig: _Signature,
    max_batch_size: int | None,
) -> InferRequest:
    """The request parsed as ``req`` from JSON ``text``, checked against ``sig``."""
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

    limit = sig.max_batch_size if max_batch_size is None else max_batch_size
    arrays: dict[str, np.ndarray] = {}
    batch_size = 1
    batch_from = ""
    offset = 0
    last_binary = ""
    for entry in entries:
        if not isinstance(entry, dict):
            raise InvalidInput("each of request 'inputs' must be a JSON object")
        name = entry.get("name")
        if not isinstance(name, str):
            raise InvalidInput("each of request 'inputs' needs a string 'name'")
        spec = sig.inputs.get(name)
        if spec is None:
            raise InvalidInput(
                f"unknown input {_brief(name)}: the model's inputs are "
                f"{', '.join(map(repr, sig.inputs))}"
            )
        if name in arrays:
            raise InvalidInput(f"input {name!r} is given more than once")
        datatype = entry.get("datatype")
        if datatype != spec.datatype:
            raise InvalidInput(
                f"input {name!r}: datatype {_brief(datatype)} does not match the model's "
                f"{spec.datatype}"
            )
        shape = _check_shape(entry.get("shape"), spec)
        if sig.batched:
            rows = shape[0]
            if rows > limit:
                raise InvalidInput(
                    f"input {name!r}: batch of {rows} is over the max batch size of {limit}"
                )
            if batch_from and rows != batch_size:
                raise InvalidInput(
                    f"input {name!r} has batch size {rows} but input {batch_from!r} has "
                    f"{batch_size}: all inputs must agree on dim 0"
                )
            batch_size, batch_from = rows, name

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
            arrays[name] = _from_binary(binary[offset:end], shape, spec)
            offset, last_binary = end, name
        elif data is None:
            raise InvalidInput(f"input {name!r} has neither 'data' nor 'binary_data_size'")
        else:
            arrays[name] = _from_json(data, shape, spec, has_booleans)

    if offset != len(binary):
        where = f"after binary input {last_binary!r}" if last_binary else "after the JSON header"
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data {where} are not accounted for by "
            "any input's binary_data_size"
        )
    if len(arrays) != len(sig.inputs):
        missing = [n for n in sig.inputs if n not in arrays]
        raise InvalidInput(f"missing input(s) {', '.join(map(repr, missing))}")

    outputs, binary_outputs = _requested_outputs(req.get("outputs"), sig, binary_default)
    return InferRequest(
        id=request_id,
        inputs=arrays,
        batch_size=batch_size,
        outputs=outputs,
        binary_outputs=binary_outputs,
        parameters=parameters,
    )


def _brief(value: Any) -> str:
    """``repr(value)``, cut short: client-sent values end up in error messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_shape(shape: Any, spec: _Tensor) -> tuple[int, ...]:
    want = spec.shape
    if not isinstance(shape, list) or len(shape) != len(want):
        raise InvalidInput(
            f"input {spec.name!r}: shape {_brief(shape)} does not match the model's {list(want)}"
        )
    for got, dim in zip(shape, want, strict=True):
        if type(got) is not int or (got != dim and (dim != -1 or got < 1)):
            raise InvalidInput(
                f"input {spec.name!r}: shape {_brief(shape)} does not match the model's "
                f"{list(want)} (-1 is any positive size)"
            )
    return tuple(shape)


def _from_binary(raw: memoryview, shape: tuple[int, ...], spec: _Tensor) -> np.ndarray:
    count = math.prod(shape)
    if spec.datatype == "BYTES":
        if count * 4 > len(raw):  # every element has a 4-byte length
            raise InvalidInput(
                f"input {spec.name!r}: binary_data_size {len(raw)} is too small for "
                f"{count} BYTES elements"
            )
        return _bytes_elements(raw, count, spec.name).reshape(shape)
    need = count * spec.dtype.itemsize
    if len(raw) != need:
        raise InvalidInput(
            f"input {spec.name!r}: binary_data_size is {len(raw)} but shape {list(shape)} "
            f"of {spec.datatype} needs {need} bytes"
        )
    if spec.datatype == "BOOL" and need and np.frombuffer(raw, np.uint8).max() > 1:
        raise InvalidInput(f"input {spec.name!r}: BOOL bytes must be 0 or 1")
    return np.frombuffer(raw, spec.dtype).reshape(shape)


def _bytes_elements(raw: memoryview, count: int, name: str) -> np.ndarray:
    out = np.empty(count, dtype=np.object_)
    end = len(raw)
    pos = 0
    unpack = _U32.unpack_from
    for i in range(count):
        if pos + 4 > end:
            raise InvalidInput(
                f"input {name!r}: binary BYTES data ends after {i} of {count} elements"
            )
        (length,) = unpack(raw, pos)
        pos += 4
        if pos + length > end:
            raise InvalidInput(
                f"input {name!r}: binary BYTES element {i} of {length} bytes runs past the data"
            )
        out[i] = bytes(raw[pos : pos + length])
        pos += length
    if pos != end:
        raise InvalidInput(
            f"input {name!r}: {end - pos} bytes left over after {count} binary BYTES elements"
        )
    return out


def _has_booleans(text: bytes | memoryview) -> bool:
    raw = text if isinstance(text, bytes) else bytes(text)
    return b"true" in raw or b"false" in raw


def _from_json(data: Any, shape: tuple[int, ...], spec: _Tensor, has_booleans: bool) -> np.ndarray:
    name = spec.name
    count = math.prod(shape)
    values: array[Any]
    if isinstance(data, _Decoded):
        values = data.values
        if len(values) != count:
            raise InvalidInput(
                f"input {name!r}: 'data' has {len(values)} elements but shape {list(shape)} "
                f"needs {count}"
            )
    else:
        if not isinstance(data, list):
            raise InvalidInput(f"input {name!r}: 'data' must be a list")
        if data and isinstance(data[0], list):
            data = _flatten(data, shape, name)
        if len(data) != count:
            raise InvalidInput(
                f"input {name!r}: 'data' has {len(data)} elements but shape {list(shape)} "
                f"needs {count}"
            )
        if spec.datatype == "BYTES":
            return _json_bytes(data, name).reshape(shape)
        if has_booleans and spec.datatype != "BOOL" and bool in set(map(type, data)):
            raise InvalidInput(
                f"input {name!r}: 'data' holds true/false, not valid {spec.datatype}; "
                + _JSON_EXPECTS[spec.datatype]
            )
        try:
            values = array(spec.code, data)
        except (TypeError, OverflowError, ValueError) as e:
            raise InvalidInput(
                f"input {name!r}: 'data' is not valid {spec.datatype} ({e}); "
                + _JSON_EXPECTS[spec.datatype]
            ) from None
    arr = np.frombuffer(values, spec.code_dtype)
    if spec.datatype == "FP16":
        with np.errstate(over="ignore"):
            arr = arr.astype(spec.dtype)
    elif spec.datatype == "BOOL":
        if count and arr.max() > 1:
            raise InvalidInput(f"input {name!r}: BOOL data must be true/false (or 0/1)")
        arr = arr.view(np.bool_)
    elif not _NATIVE_IS_LITTLE:  # pragma: no cover - little-endian hosts only in CI
        arr = arr.astype(spec.dtype)
    if spec.datatype in _FLOATS and np.isinf(arr).any():
        raise InvalidInput(f"input {name!r}: a value is out of range for {spec.datatype}")
    return arr.reshape(shape)


_FLOATS: Final = frozenset({"FP16", "FP32"})
_JSON_EXPECTS: Final = {
    **dict.fromkeys(("FP16", "FP32", "FP64"), "expected numbers"),
    **{
        t: f"expected integers in the {t} range"
        for t in ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")
    },
    "BOOL": "expected true/false",
}


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


def _json_bytes(data: list[Any], name: str) -> np.ndarray:
    out = np.empty(len(data), dtype=np.object_)
    try:
        out[:] = [s.encode() for s in data]
    except (AttributeError, UnicodeError):
        raise InvalidInput(f"input {name!r}: BYTES 'data' must be strings") from None
    return out


def _requested_outputs(
    requested: Any, sig: _Signature, binary_default: bool
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
        if name not in sig.outputs:
            raise InvalidInput(
                f"unknown output {_brief(name)}: the model's outputs are "
                f"{', '.join(map(repr, sig.output_names))}"
            )
        if name in names:
            raise InvalidInput(f"output {name!r} is requested more than once")
        params = entry.get("parameters")
        as_binary = binary_default
        if params is not None:
            if not isinstance(params, dict):
                raise InvalidInput(f"output {name!r}: 'parameters' must be a JSON object")
            if "shared_memory_region" in params:
                raise InvalidInput(f"output {name!r}: shared memory outputs are not supported")
            if params.get("classification"):
                raise InvalidInput(f"output {name!r}: classification outputs are not supported")
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
    sig = _signature(manifest)
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
                raw = _serialize_bytes(arr, name)
                buffers.append(raw)
                tensors.append(_binary_entry(name, spec.datatype, arr.shape, len(raw)))
            else:
                tensors.append(
                    _json_entry(name, spec.datatype, arr.shape, _json_strings(arr, name))
                )
            continue
        arr = _as_wire_array(value, spec)
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


def _as_wire_array(value: Any, spec: _Tensor) -> np.ndarray:
    """``value`` as a C-contiguous little-endian array of the spec's dtype."""
    if type(value) is np.ndarray and value.dtype == spec.dtype and value.flags.c_contiguous:
        return value
    try:
        with np.errstate(all="ignore"):
            return np.asarray(value, dtype=spec.dtype, order="C")
    except (TypeError, ValueError, OverflowError) as e:
        raise InferenceFailed(
            f"output {spec.name!r} cannot be converted to {spec.datatype}: {e}"
        ) from None


def _elements(arr: np.ndarray) -> list[Any]:
    items: list[Any] = arr.reshape(-1).tolist()
    return items


def _json_strings(arr: np.ndarray, name: str) -> list[str]:
    out: list[str] = []
    for v in _elements(arr):
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


def _serialize_bytes(arr: np.ndarray, name: str) -> bytes:
    pack = _U32.pack
    parts: list[bytes] = []
    for v in _elements(arr):
        if isinstance(v, str):
            v = v.encode()
        elif not isinstance(v, bytes):
            raise InferenceFailed(f"output {name!r} holds a {type(v).__name__}, not bytes or str")
        parts.append(pack(len(v)))
        parts.append(v)
    return b"".join(parts)
