"""The one V2 datatype table, and that every side reads it the same way."""

from __future__ import annotations

from typing import get_args

import numpy as np
import onnx
import pytest

from compilers.signature import numpy_dtype, read_onnx_signature
from loadtest.payloads import _DTYPES
from model_store.manifest import DATATYPES, V2_DATATYPES, Datatype
from serving.inference.codec import DATATYPE_TO_NUMPY, NUMPY_TO_DATATYPE

# The element sizes of the V2 protocol's fixed-size types (BYTES has none).
_SIZES = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "FP32": 4,
    "FP64": 8,
}


def test_the_table_is_every_datatype_a_manifest_accepts() -> None:
    assert get_args(Datatype) == DATATYPES
    assert [t.name for t in V2_DATATYPES.values()] == list(DATATYPES)


@pytest.mark.parametrize("name", DATATYPES)
def test_numpy_dtypes_are_little_endian_of_the_v2_size(name: str) -> None:
    dtype = V2_DATATYPES[name].numpy
    if name == "BYTES":
        assert dtype == np.dtype(object)
        return
    assert dtype.itemsize == _SIZES[name]
    assert dtype.byteorder in ("<", "|", "=") and dtype.newbyteorder("<") == dtype
    kinds = {"BOOL": "b", "FP": "f", "UINT": "u", "INT": "i"}
    assert dtype.kind == kinds[name.rstrip("0123456789")]


def test_triton_config_names_are_tritons() -> None:
    triton = {name: t.triton for name, t in V2_DATATYPES.items()}
    assert triton.pop("BYTES") == "TYPE_STRING"
    assert triton == {name: f"TYPE_{name}" for name in triton}


def test_the_codec_compilers_and_loadtest_read_the_same_table() -> None:
    for name, t in V2_DATATYPES.items():
        assert DATATYPE_TO_NUMPY[name] == t.numpy
        assert NUMPY_TO_DATATYPE[t.numpy] == name
        assert numpy_dtype(name) == t.numpy
        if name != "BYTES":
            assert _DTYPES[name] == t.numpy
    with pytest.raises(ValueError, match="unknown V2 datatype 'FP8'"):
        numpy_dtype("FP8")


@pytest.mark.parametrize("name", DATATYPES)
def test_an_onnx_graph_of_each_type_reads_as_the_v2_type_of_the_same_numpy_dtype(
    name: str,
) -> None:
    # ONNX's own numpy mapping, not ours: the compilers' ONNX table must agree with it.
    elem = next(
        e
        for e in onnx.TensorProto.DataType.values()
        if e not in (onnx.TensorProto.UNDEFINED,)
        and onnx.helper.tensor_dtype_to_np_dtype(e) == V2_DATATYPES[name].numpy
        and (name != "BYTES" or e == onnx.TensorProto.STRING)
    )
    x = onnx.helper.make_tensor_value_info("x", elem, [-1, 3])
    y = onnx.helper.make_tensor_value_info("y", elem, [-1, 3])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    sig = read_onnx_signature(onnx.helper.make_model(graph))
    assert [t.datatype for t in (*sig.inputs, *sig.outputs)] == [name, name]
