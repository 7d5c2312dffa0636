"""Large JSON bodies, decoded a slice at a time so that the event loop runs in between.

``orjson.loads`` of a 60 MB body holds the loop (and the GIL) for more than half a
second and builds a Python float per number, about 32 bytes each. Here the long
numeric arrays of a body (its tensors' ``data``) are found by a scan in slices and
cut out of it; what is left, the small skeleton, is parsed whole. Each array is then
converted slice by slice, straight into the typed array of its tensor, so that no
step holds the loop for more than a few milliseconds and memory stays within a
small multiple of the body. Only numbers, brackets, commas and white space can be
part of such an array, so a JSON string is never cut.
"""

from __future__ import annotations

import asyncio
import re
from array import array
from dataclasses import dataclass
from typing import Final

import orjson

from serving.errors import InvalidInput

__all__ = ["SLICE_BYTES", "Sliced", "cut_arrays", "parse_numbers", "placeholder_index"]

#: The most bytes one step scans or converts (a few milliseconds of work).
SLICE_BYTES: Final = 256 * 1024
#: Numeric runs at least this long are cut out of the skeleton.
_MIN_RUN: Final = 4096
_NUMERIC = rb"[0-9eE+\-.,\s\[\]]"
_START: Final = re.compile(rb"\[" + _NUMERIC + b"{%d,}" % _MIN_RUN)
_MORE: Final = re.compile(_NUMERIC + b"*")
_PLACEHOLDER: Final = "\0fermion-slice-"
_NOT_STRUCTURE: Final = b"0123456789eE+-. \t\r\n"


@dataclass(frozen=True, slots=True)
class Sliced:
    """A numeric array cut out of a body: its text, brackets and all."""

    text: memoryview


def placeholder_index(value: object) -> int | None:
    """The index of the array a skeleton's placeholder stands for, else None."""
    if isinstance(value, str) and value.startswith(_PLACEHOLDER):
        tail = value[len(_PLACEHOLDER) :]
        if tail.isdigit():
            return int(tail)
    return None


async def cut_arrays(body: bytes | bytearray | memoryview) -> tuple[bytes, list[Sliced]]:
    """The body with its long numeric arrays replaced by placeholders, and those arrays."""
    view = memoryview(body)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    raw = view.obj
    if not isinstance(raw, bytes | bytearray) or len(raw) != len(view):
        raw = bytes(view)
    parts: list[bytes] = []
    arrays: list[Sliced] = []
    pos = kept = 0
    end = len(raw)
    while pos < end:
        window = min(end, pos + SLICE_BYTES)
        match = _START.search(raw, pos, window)
        await asyncio.sleep(0)
        if match is None:
            # A run may straddle the window's end: look again from just before it.
            pos = window if window == end else max(pos + 1, window - _MIN_RUN)
            continue
        stop = match.end()
        while stop < end:
            more = _MORE.match(raw, stop, min(end, stop + SLICE_BYTES))
            assert more is not None
            stop = more.end()
            await asyncio.sleep(0)
            if stop < min(end, more.start() + SLICE_BYTES):
                break
        # The run may take in commas and spaces past the array's last bracket.
        close = raw.rfind(b"]", match.start(), stop)
        if close < 0:
            pos = stop
            continue
        stop = close + 1
        parts.append(bytes(raw[kept : match.start()]))
        parts.append(orjson.dumps(f"{_PLACEHOLDER}{len(arrays)}"))
        arrays.append(Sliced(view[match.start() : stop]))
        kept = pos = stop
    parts.append(bytes(raw[kept:]))
    return b"".join(parts), arrays


def _nested(shape: tuple[int, ...]) -> bytes:
    """The brackets and commas of a JSON array nested exactly as ``shape``."""
    if not shape:
        return b""
    inner = _nested(shape[1:])
    return b"[" + b",".join([inner] * shape[0]) + b"]" if shape[0] else b"[]"


async def parse_numbers(
    sliced: Sliced, shape: tuple[int, ...], code: str, name: str, datatype: str
) -> array[float] | array[int]:
    """The numbers of ``sliced`` (flat, or nested exactly as ``shape``) as an ``array(code)``."""
    text = sliced.text
    count = 1
    for dim in shape:
        count *= dim
    out: array[float] | array[int] = array(code)
    structure: list[bytes] = []
    start = 0
    end = len(text)
    while start < end:
        stop = min(end, start + SLICE_BYTES)
        if stop < end:
            cut = bytes(text[stop : min(end, stop + 64)]).find(b",")
            stop = stop + cut + 1 if cut >= 0 else min(end, stop + 64)
        piece = bytes(text[start:stop])
        structure.append(piece.translate(None, _NOT_STRUCTURE))
        numbers = piece.translate(None, b"[]").strip().strip(b",")
        if numbers:
            try:
                out.extend(array(code, orjson.loads(b"[" + numbers + b"]")))
            except (orjson.JSONDecodeError, TypeError, OverflowError, ValueError) as e:
                raise InvalidInput(
                    f"input {name!r}: 'data' is not valid {datatype} ({e})"
                ) from None
        start = stop
        await asyncio.sleep(0)
    if len(out) != count:
        raise InvalidInput(
            f"input {name!r}: 'data' has {len(out)} elements but shape {list(shape)} needs {count}"
        )
    layout = b"".join(structure)
    flat = b"[" + b"," * (count - 1) + b"]" if count else b"[]"
    if layout != flat and layout != _nested(shape):
        raise InvalidInput(f"input {name!r}: nested 'data' does not match shape {list(shape)}")
    return out
