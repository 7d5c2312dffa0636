"""Request bodies built from a served model's metadata (``GET /v2/models/{m}``).

Inputs come from a samples file (``.npz``, one array per input name, rows along the
batch axis; the demo model publishes one with each version) or, without one, are drawn
at random within the signature. Bodies are encoded once, up front, as V2 JSON or with
the binary tensor extension; the hot loop only picks one. ``build_tensors`` gives the
same inputs as arrays, for another transport to encode (``loadtest.grpc_client``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson

from model_store.manifest import SAMPLES_FILE, V2_DATATYPES

__all__ = [
    "HEADER_LENGTH",
    "VERSION_HEADER",
    "Payload",
    "Tensors",
    "build_payloads",
    "build_tensors",
    "error_message",
    "find_samples",
    "infer_path",
    "load_samples",
    "raw_tensor",
    "served_version",
]

#: The header giving the length of the JSON part of a binary-extension body.
HEADER_LENGTH: Final = "inference-header-content-length"
#: The header naming the version that served a response (when the gateway sends it).
VERSION_HEADER: Final = "fermion-model-version"

#: V2 datatype -> numpy dtype, from the one V2 table (BYTES excluded: built separately).
_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    k: v.numpy for k, v in V2_DATATYPES.items() if k != "BYTES"
}


#: One request's inputs: each input's metadata entry (name, datatype, shape) and its array.
Tensors = list[tuple[Mapping[str, Any], np.ndarray]]


@dataclass(frozen=True)
class Payload:
    """One encoded inference request: its body and the headers that describe it, and the
    inputs it encodes (for a transport that encodes them its own way, as gRPC's does)."""

    body: bytes
    headers: dict[str, str]
    tensors: Tensors = field(default_factory=list, compare=False, repr=False)


def infer_path(model: str, version: str | None = None) -> str:
    """The V2 inference path of ``model`` (of one ``version`` when given)."""
    if version:
        return f"/v2/models/{model}/versions/{version}/infer"
    return f"/v2/models/{model}/infer"


def load_samples(path: Path) -> dict[str, np.ndarray]:
    """Every array in an ``.npz`` samples file, by name."""
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def find_samples(store_root: Path, model: str, version: int | None = None) -> Path | None:
    """The samples file published with ``model`` (its latest version by default), if any."""
    from model_store.store import ModelStore

    store = ModelStore(store_root)
    manifest = store.manifest(model, version)
    entry = next((f for f in manifest.files if f.file == SAMPLES_FILE), None)
    return None if entry is None else Path(store.artifact_path(manifest, entry))


def _shape(spec: Mapping[str, Any], batch_size: int) -> list[int]:
    dims = [int(d) for d in spec["shape"]]
    if dims and dims[0] == -1:
        dims[0] = batch_size
    return [1 if d == -1 else d for d in dims]


def _random(datatype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    if datatype == "BYTES":
        words = [
            "".join(chr(97 + c) for c in rng.integers(0, 26, 8)) for _ in range(np.prod(shape))
        ]
        return np.array([w.encode() for w in words], dtype=object).reshape(shape)
    dtype = _DTYPES[datatype]
    if dtype.kind == "f":
        return rng.random(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    return rng.integers(0, 10, shape).astype(dtype)


def _rows(
    spec: Mapping[str, Any], samples: np.ndarray, batch_size: int, count: int
) -> list[np.ndarray]:
    name, datatype = spec["name"], spec["datatype"]
    declared = [int(d) for d in spec["shape"]]
    row_dims = list(samples.shape[1:])
    if len(row_dims) != len(declared) - 1 or any(
        d not in (-1, r) for d, r in zip(declared[1:], row_dims, strict=True)
    ):
        raise ValueError(
            f"samples for input {name!r} have rows of shape {row_dims}, "
            f"the model wants {declared[1:]}"
        )
    data = samples.astype(object if datatype == "BYTES" else _DTYPES[datatype])
    n = data.shape[0]
    if n == 0:
        raise ValueError(f"samples for input {name!r} are empty")
    batches = []
    for i in range(count):
        idx = [(i * batch_size + j) % n for j in range(batch_size)]
        batches.append(np.ascontiguousarray(data[idx]).reshape([batch_size, *row_dims]))
    return batches


def _json_body(tensors: Tensors) -> bytes:
    inputs = []
    for spec, arr in tensors:
        if spec["datatype"] == "BYTES":
            data: Any = [x.decode() if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
        elif spec["datatype"] == "FP16":
            data = arr.astype(np.float32).reshape(-1)
        else:
            data = arr.reshape(-1)
        inputs.append(
            {
                "name": spec["name"],
                "shape": list(arr.shape),
                "datatype": spec["datatype"],
                "data": data,
            }
        )
    return orjson.dumps({"inputs": inputs}, option=orjson.OPT_SERIALIZE_NUMPY)


def raw_tensor(datatype: str, arr: np.ndarray) -> bytes:
    """``arr`` as V2 raw bytes: little-endian elements, or length-prefixed BYTES elements."""
    if datatype == "BYTES":
        return b"".join(
            len(b).to_bytes(4, "little") + b
            for b in (x if isinstance(x, bytes) else str(x).encode() for x in arr.reshape(-1))
        )
    return arr.tobytes()


def _binary_body(tensors: Tensors) -> tuple[bytes, int]:
    inputs, chunks = [], []
    for spec, arr in tensors:
        raw = raw_tensor(spec["datatype"], arr)
        chunks.append(raw)
        inputs.append(
            {
                "name": spec["name"],
                "shape": list(arr.shape),
                "datatype": spec["datatype"],
                "parameters": {"binary_data_size": len(raw)},
            }
        )
    header = orjson.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}})
    return header + b"".join(chunks), len(header)


def build_payloads(
    metadata: Mapping[str, Any],
    samples: Mapping[str, np.ndarray] | None = None,
    *,
    binary: bool = False,
    batch_size: int = 1,
    count: int = 64,
    seed: int = 0,
) -> list[Payload]:
    """``count`` distinct requests for the model ``metadata`` describes.

    With ``samples``, every input is taken from the array of its name (rows cycled,
    ``batch_size`` rows a request); without, inputs are random within the signature.
    """
    payloads = []
    for tensors in build_tensors(metadata, samples, batch_size=batch_size, count=count, seed=seed):
        if binary:
            body, length = _binary_body(tensors)
            headers = {
                "content-type": "application/octet-stream",
                HEADER_LENGTH: str(length),
            }
        else:
            body = _json_body(tensors)
            headers = {"content-type": "application/json"}
        payloads.append(Payload(body, headers, tensors))
    return payloads


def build_tensors(
    metadata: Mapping[str, Any],
    samples: Mapping[str, np.ndarray] | None = None,
    *,
    batch_size: int = 1,
    count: int = 64,
    seed: int = 0,
) -> list[Tensors]:
    """The inputs of ``count`` distinct requests, as ``build_payloads`` would encode them."""
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    specs = list(metadata.get("inputs") or [])
    if not specs:
        raise ValueError(f"model {metadata.get('name')!r} declares no inputs")
    for spec in specs:
        if spec["datatype"] not in _DTYPES and spec["datatype"] != "BYTES":
            raise ValueError(f"input {spec['name']!r}: unsupported datatype {spec['datatype']}")
    rng = np.random.default_rng(seed)
    columns: list[list[np.ndarray]] = []
    for spec in specs:
        if samples is not None:
            arr = samples.get(spec["name"])
            if arr is None:
                raise ValueError(
                    f"the samples have no array for input {spec['name']!r} "
                    f"(they have: {', '.join(sorted(samples)) or 'none'})"
                )
            columns.append(_rows(spec, arr, batch_size, count))
        else:
            shape = _shape(spec, batch_size)
            columns.append([_random(spec["datatype"], shape, rng) for _ in range(count)])
    return [
        [(spec, col[i]) for spec, col in zip(specs, columns, strict=True)] for i in range(count)
    ]


def served_version(header: str | None, body: bytes, header_length: str | None) -> str | None:
    """The version that served a response: its version header, else the body's
    ``model_version`` (in the JSON part of a binary response); None when neither says."""
    if header:
        return header
    try:
        doc = orjson.loads(body[: int(header_length)] if header_length else body)
    except (orjson.JSONDecodeError, ValueError):
        return None
    version = doc.get("model_version") if isinstance(doc, dict) else None
    return None if version is None else str(version)


def error_message(status: int, body: bytes) -> str:
    """``"<status> <message>"`` for a failed response (its ``{"error": ...}`` when it has one)."""
    message = ""
    try:
        doc = orjson.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            message = doc["error"]
    except orjson.JSONDecodeError:
        message = body[:200].decode("utf-8", errors="replace").strip()
    message = " ".join(message.split())
    if len(message) > 160:
        message = message[:157] + "..."
    return f"{status} {message}".rstrip()
