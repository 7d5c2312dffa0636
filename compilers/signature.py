"""A model's signature: its inputs and outputs as V2 tensor specs, mapped to numpy and ONNX."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from model_store.manifest import V2_DATATYPES, TensorSpec

__all__ = [
    "ModelSignature",
    "check_inputs",
    "numpy_dtype",
    "random_inputs",
    "read_onnx_signature",
]

_ONNX_TO_V2: dict[int, str] = {
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.STRING: "BYTES",
}


@dataclass(frozen=True)
class ModelSignature:
    """The inputs and outputs of a model, in order, as V2 tensor specs."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        """The input names, in order."""
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """The output names, in order."""
        return [t.name for t in self.outputs]

    def batchable(self) -> bool:
        """Whether dim 0 of every input and output is dynamic (-1)."""
        return all(t.shape and t.shape[0] == -1 for t in (*self.inputs, *self.outputs))


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of a V2 datatype, e.g. ``FP32`` -> ``float32``."""
    try:
        return V2_DATATYPES[datatype].numpy
    except KeyError:
        raise ValueError(
            f"unknown V2 datatype {datatype!r}; known: {', '.join(V2_DATATYPES)}"
        ) from None


def _value_info_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise ValueError(f"graph value {value.name!r} is not a tensor")
    datatype = _ONNX_TO_V2.get(tensor_type.elem_type)
    if datatype is None:
        elem = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise ValueError(f"graph value {value.name!r} has type {elem}, which V2 cannot carry")
    if not tensor_type.HasField("shape"):
        raise ValueError(f"graph value {value.name!r} has no shape (not even its rank)")
    # A dim with a name (dim_param) or with neither name nor value is dynamic.
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    return TensorSpec(name=value.name, datatype=datatype, shape=shape)  # type: ignore[arg-type]


def read_onnx_signature(model: onnx.ModelProto | str | Path) -> ModelSignature:
    """The signature of an ONNX model (a loaded proto or a file), from its graph.

    Graph inputs that are initializers (weights listed as inputs by old exporters)
    are not inputs of the model.
    """
    proto = (
        model
        if isinstance(model, onnx.ModelProto)
        else onnx.load(str(model), load_external_data=False)
    )
    graph = proto.graph
    weights = {init.name for init in graph.initializer}
    try:
        inputs = tuple(_value_info_spec(v) for v in graph.input if v.name not in weights)
        outputs = tuple(_value_info_spec(v) for v in graph.output)
    except ValueError as exc:
        raise ValueError(f"cannot read the signature of the ONNX graph: {exc}") from None
    return ModelSignature(inputs=inputs, outputs=outputs)


def random_inputs(
    specs: Sequence[TensorSpec], batch_size: int, *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs for ``specs``, with a dynamic dim 0 set to ``batch_size``.

    Floats are uniform in [0, 1), integers in [0, 10) and booleans fair coins: small
    values, so that integer inputs used as indices stay in range of most tables.
    Other dynamic dims become 1.
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = [d if d > 0 else 1 for d in spec.shape]
        if shape and spec.shape[0] == -1:
            shape[0] = batch_size
        dtype = numpy_dtype(spec.datatype)
        if spec.datatype == "BYTES":
            raise ValueError(f"cannot make random values for BYTES input {spec.name!r}")
        if np.issubdtype(dtype, np.floating):
            arrays[spec.name] = rng.random(shape).astype(dtype)
        elif dtype == np.bool_:
            arrays[spec.name] = rng.random(shape) < 0.5
        else:
            arrays[spec.name] = rng.integers(0, 10, shape).astype(dtype)
    return arrays


def check_inputs(specs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray]) -> None:
    """Raise ``ValueError`` unless ``arrays`` has one array per spec of its dtype and shape."""
    names = {s.name for s in specs}
    if set(arrays) != names:
        raise ValueError(
            f"sample inputs are {sorted(arrays)}, the model's inputs are {sorted(names)}"
        )
    batch = {a.shape[0] if a.ndim else None for a in arrays.values()}
    if len(batch) != 1:
        raise ValueError(f"sample inputs disagree on the batch size: {sorted(map(str, batch))}")
    for spec in specs:
        array = arrays[spec.name]
        if array.dtype != numpy_dtype(spec.datatype):
            raise ValueError(
                f"sample input {spec.name!r} is {array.dtype}, the model wants {spec.datatype}"
            )
        if len(array.shape) != len(spec.shape) or any(
            d != -1 and d != n for d, n in zip(spec.shape, array.shape, strict=True)
        ):
            raise ValueError(
                f"sample input {spec.name!r} has shape {list(array.shape)}, "
                f"the model wants {spec.shape}"
            )
