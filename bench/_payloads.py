"""Request bodies (V2 JSON, V2 binary tensors, BentoML's JSON) and the check of an answer."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "Answer",
    "Payload",
    "bentoml_payload",
    "binary_payload",
    "check_answer",
    "json_payload",
]


@dataclass(frozen=True)
class Payload:
    """One request body and the headers that go with it."""

    kind: str
    body: bytes
    content_type: str
    #: ``Inference-Header-Content-Length`` for a binary body, else ``None``.
    header_length: int | None = None

    def headers(self) -> dict[str, str]:
        """The HTTP headers this body needs."""
        headers = {"Content-Type": self.content_type}
        if self.header_length is not None:
            headers["Inference-Header-Content-Length"] = str(self.header_length)
        return headers


def json_payload(input_name: str, x: npt.NDArray[np.float32]) -> Payload:
    """A V2 JSON body carrying ``x`` as a flat list of numbers."""
    tensor = {
        "name": input_name,
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": x.ravel().tolist(),
    }
    body = json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode()
    return Payload("json", body, "application/json")


def bentoml_payload(x: npt.NDArray[np.float32]) -> Payload:
    """BentoML's JSON body for an API with one array argument ``input``: nested lists."""
    body = json.dumps({"input": x.tolist()}, separators=(",", ":")).encode()
    return Payload("bentoml", body, "application/json")


def binary_payload(input_name: str, output_name: str, x: npt.NDArray[np.float32]) -> Payload:
    """A V2 binary-tensor body: a JSON header, then ``x`` as little-endian float32 bytes."""
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": input_name,
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return Payload("binary", head + raw, "application/octet-stream", len(head))


@dataclass(frozen=True)
class Answer:
    """What one checked request got: ``error`` is ``None`` when the answer is right."""

    error: str | None
    model_version: str | None = None


def _decode_output(
    head: dict[str, Any], body: bytes, header_length: int | None, output_name: str
) -> np.ndarray[Any, Any]:
    offset = len(body) if header_length is None else header_length
    for output in head.get("outputs", []):
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            chunk = body[offset : offset + int(size)]
            offset += int(size)
        if output.get("name") != output_name:
            continue
        dtype = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2"}.get(output.get("datatype"), "<f4")
        if size is not None:
            return np.frombuffer(chunk, dtype=dtype).reshape(output["shape"])
        return np.asarray(output["data"], dtype=dtype).reshape(output["shape"])
    raise ValueError(f"the answer has no output {output_name!r}: {head}")


def check_answer(
    url: str,
    payload: Payload,
    output_name: str,
    expected_class: int,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
) -> Answer:
    """POST ``payload`` once (with ``headers`` too) and check that the output's argmax is
    ``expected_class``."""
    request = urllib.request.Request(
        url, payload.body, {**payload.headers(), **(headers or {})}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            length = response.headers.get("Inference-Header-Content-Length")
    except urllib.error.HTTPError as exc:
        return Answer(f"HTTP {exc.code}: {exc.read()[:300]!r}")
    except OSError as exc:
        return Answer(f"request failed: {exc}")
    header_length = None if length is None else int(length)
    try:
        head = json.loads(body if header_length is None else body[:header_length])
        if isinstance(head, list):  # BentoML answers the array itself
            output, version = np.asarray(head, dtype=np.float32), None
        else:
            output = _decode_output(head, body, header_length, output_name)
            version = head.get("model_version")
            version = None if version is None else str(version)
    except (ValueError, KeyError, TypeError) as exc:
        return Answer(f"cannot decode the answer ({exc}): {body[:300]!r}")
    got = int(np.argmax(output.reshape(-1)))
    if got != expected_class:
        return Answer(f"argmax {got}, expected {expected_class}", version)
    return Answer(None, version)
