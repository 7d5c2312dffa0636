"""Tensor conversion: JSON and gRPC value lists to typed arrays, as ``array`` converts them."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import pytest

from model_store.manifest import TensorSpec
from serving.errors import InvalidInput
from serving.inference import tensors
from serving.inference.tensors import _ARRAY_CODES, _packed, _tensor, from_values

_VALUE_LISTS: list[list[Any]] = [
    [],
    [0, 1, 2, 3],
    [0.5, -1.25, 3.0e38, -3.0e38, 1e-45],
    [1e39, 0.0],  # past float32: array gives inf (refused later), struct raises
    [float("inf"), float("-inf"), 1.0],  # gRPC contents may hold them
    [True, False, True],
    [255, 256],
    [-1, 0, 1],
    [-129, 127, 128, -128],
    [32767, 32768, -32769],
    [2**31 - 1, 2**31, -(2**31) - 1],
    [2**63 - 1, 2**63, -(2**63) - 1],
    [2**64 - 1, 2**64],
    [10**400],
    [1.5, 2, 3],  # a float among integers
    ["1", 2],
    [None, 1],
    [[1, 2], 3],
]


def _outcome(convert: Any, code: str, values: Sequence[Any]) -> tuple[str, Any]:
    try:
        return "ok", bytes(convert(code, values))
    except Exception as e:
        return type(e).__name__, str(e)


@pytest.mark.parametrize("code", sorted(set(_ARRAY_CODES.values())))
@pytest.mark.parametrize("values", _VALUE_LISTS, ids=range(len(_VALUE_LISTS)))
def test_packed_converts_exactly_as_array_does(code: str, values: list[Any]) -> None:
    # The same bytes for what array accepts; the same exception and message otherwise.
    assert _outcome(_packed, code, values) == _outcome(array, code, values)
    assert _outcome(_packed, code, values * 300) == _outcome(array, code, values * 300)


@pytest.mark.parametrize("values", _VALUE_LISTS[1:8], ids=range(1, 8))
def test_packed_converts_a_grpc_contents_field_as_array_does(values: list[Any]) -> None:
    from serving.grpc._proto import grpc_service_pb2 as pb

    contents = pb.InferTensorContents()
    contents.fp64_contents.extend(float(v) for v in values if abs(float(v)) < 1e300)
    contents.int64_contents.extend(v for v in values if type(v) is int and -(2**63) <= v < 2**63)
    for field in (contents.fp64_contents, contents.int64_contents):
        for code in sorted(set(_ARRAY_CODES.values())):
            assert _outcome(_packed, code, field) == _outcome(array, code, field)


def test_packed_takes_every_sequence_and_any_length() -> None:
    long = [0.25] * (tensors._PACK_MAX + 1)
    assert bytes(_packed("f", long)) == array("f", long).tobytes()
    assert bytes(_packed("d", (1.0, 2.0))) == array("d", (1.0, 2.0)).tobytes()
    assert bytes(_packed("q", range(5))) == array("q", range(5)).tobytes()
    # Typed buffers go to array as they are (array's own rules for them).
    assert bytes(_packed("d", array("d", [1.5, 2.5]))) == array("d", [1.5, 2.5]).tobytes()
    buffer = np.arange(4, dtype=np.int64)
    assert bytes(_packed("q", cast(Sequence[Any], buffer))) == array("q", buffer).tobytes()


def test_packed_keeps_a_bounded_cache_of_converters() -> None:
    for n in range(tensors._PACKERS_MAX + 10):
        _packed("f", [0.0] * n)
    assert 0 < len(tensors._packers) <= tensors._PACKERS_MAX


def test_from_values_refuses_what_it_refused_before() -> None:
    spec = _tensor(TensorSpec(name="x", datatype="FP32", shape=[-1, 2]))
    out = from_values([1, 2.5, -3.0, 4], (2, 2), spec, "'data'")
    np.testing.assert_array_equal(out, np.array([[1, 2.5], [-3, 4]], np.float32))
    with pytest.raises(InvalidInput, match="out of range for FP32"):
        from_values([1e39, 0.0], (1, 2), spec, "'data'")
    with pytest.raises(InvalidInput, match="is not valid FP32"):
        from_values(["1", 0.0], (1, 2), spec, "'data'")
    ints = _tensor(TensorSpec(name="i", datatype="UINT8", shape=[-1]))
    with pytest.raises(InvalidInput, match="is not valid UINT8"):
        from_values([256], (1,), ints, "'data'")
