"""The manifest of one published model version: its signature and its artifacts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "DATATYPES",
    "SAMPLES_FILE",
    "V2_DATATYPES",
    "Artifact",
    "ModelManifest",
    "Parity",
    "StoredFile",
    "TensorSpec",
    "V2Datatype",
    "validate_model_name",
]


@dataclass(frozen=True, slots=True)
class V2Datatype:
    """One KServe V2 datatype: its wire name, numpy dtype and Triton model-config name."""

    name: str
    #: The numpy dtype of its elements (little-endian, as on the wire; object for BYTES).
    numpy: np.dtype[Any]
    #: Its ``data_type`` in a Triton model configuration, e.g. ``TYPE_FP32``.
    triton: str


def _v2(name: str, dtype: Any, triton: str) -> tuple[str, V2Datatype]:
    return name, V2Datatype(name, np.dtype(dtype), triton)


#: The one table of KServe V2 datatypes, in wire order; every layer reads it.
V2_DATATYPES: Final[Mapping[str, V2Datatype]] = dict(
    (
        _v2("BOOL", np.bool_, "TYPE_BOOL"),
        _v2("UINT8", "<u1", "TYPE_UINT8"),
        _v2("UINT16", "<u2", "TYPE_UINT16"),
        _v2("UINT32", "<u4", "TYPE_UINT32"),
        _v2("UINT64", "<u8", "TYPE_UINT64"),
        _v2("INT8", "<i1", "TYPE_INT8"),
        _v2("INT16", "<i2", "TYPE_INT16"),
        _v2("INT32", "<i4", "TYPE_INT32"),
        _v2("INT64", "<i8", "TYPE_INT64"),
        _v2("FP16", "<f2", "TYPE_FP16"),
        _v2("FP32", "<f4", "TYPE_FP32"),
        _v2("FP64", "<f8", "TYPE_FP64"),
        _v2("BYTES", np.object_, "TYPE_STRING"),
    )
)

#: The KServe V2 datatypes, as they appear on the wire.
DATATYPES: Final = tuple(V2_DATATYPES)

#: The file of sample inputs published with a version (one array per input name).
SAMPLES_FILE: Final = "samples.npz"

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a safe model name, else raise ``ValueError``.

    A name is 1-128 characters of letters, digits, ``_``, ``-`` and ``.``, starts
    with a letter or digit, and is never ``.``/``..`` or a path.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, with no '..' and no slashes"
        )
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One input or output: V2 name, datatype and shape (-1 marks a dynamic dim)."""

    name: str = Field(min_length=1, max_length=256)
    datatype: Datatype
    shape: list[int]

    @field_validator("shape")
    @classmethod
    def _check_shape(cls, shape: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in shape):
            raise ValueError(f"shape dims must be positive or -1, got {shape}")
        return shape


class Parity(_Strict):
    """How far an artifact's outputs were from the reference's on sample inputs."""

    reference: str
    samples: int
    max_abs_err: float
    max_rel_err: float
    atol: float
    rtol: float
    top1_agreement: float | None = None


class StoredFile(_Strict):
    """A file of a published version, with the digest that loading verifies."""

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)

    @field_validator("file")
    @classmethod
    def _check_file(cls, file: str) -> str:
        bad = ("/", "\\", "\x00")
        if (
            not file
            or any(c in file for c in bad)
            or file.startswith(".")
            or file == "manifest.json"
        ):
            raise ValueError(f"a stored file must be a plain file name, got {file!r}")
        return file


class Artifact(StoredFile):
    """One compiled form of the model, for one target (and host kind)."""

    target: str
    parity: Parity | None = None
    #: What a host needs to run it, and how it was built (precision, device, cache key).
    options: dict[str, Any] = Field(default_factory=dict)


class ModelManifest(_Strict):
    """Everything serving needs to know about a published model version."""

    name: str
    version: int = Field(ge=1)
    platform: str
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    max_batch_size: int = Field(ge=0)
    #: What the store holds for this version (at least one when published). Empty only
    #: for a version the gateway serves from an upstream V2 server and never published.
    artifacts: list[Artifact] = Field(default_factory=list)
    #: Other files published with the version (sample inputs, calibration sets).
    files: list[StoredFile] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        return validate_model_name(name)

    def input(self, name: str) -> TensorSpec | None:
        """The input spec called ``name``, if any."""
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        """The output spec called ``name``, if any."""
        return next((t for t in self.outputs if t.name == name), None)

    def artifact(self, target: str) -> Artifact | None:
        """The first artifact for ``target``, if any."""
        return next((a for a in self.artifacts if a.target == target), None)
