"""Finished spans as an OTLP ``ExportTraceServiceRequest``, written straight to
protobuf's wire format.

The OpenTelemetry SDK's encoder builds a protobuf object per span, attribute and
value and then serialises the tree: about 30 µs a span on the 2-core VM, on the
exporter's thread, holding the GIL the event loop needs. Written directly, with the
encoding of each attribute (key and value) remembered, a span takes about 10 µs.

The message is the one the SDK's ``encode_spans`` builds, field for field
(``tests/serving/observability/test_otlp_wire.py`` parses both and compares them):
spans grouped by resource, then by instrumentation scope, in the order they come;
the span flags say whether the parent was remote; a link's trace state and a
resource's dropped-attribute count are left out, as the SDK leaves them. Only the
order of fields inside a message may differ, which protobuf allows.

Wire format (https://protobuf.dev/programming-guides/encoding/): a field is a tag,
``field number << 3 | wire type``, then a varint (type 0), 8 little-endian bytes
(type 1), a varint length and that many bytes (type 2), or 4 little-endian bytes
(type 5). A proto3 scalar at its default is not written, except inside a oneof.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.trace import SpanKind, StatusCode

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext

__all__ = ["encode_spans"]

log = logging.getLogger("fermion.tracing")

_FIXED64: Final = struct.Struct("<Q").pack
_DOUBLE: Final = struct.Struct("<d").pack
_FIXED32: Final = struct.Struct("<I").pack
#: Span.flags: the parent's is-remote bit is known, and (second bit) it is set.
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200
#: Encoded attributes remembered at most (a few hundred in a gateway's spans).
_KEY_VALUES_MAX: Final = 4096
#: Longer str and bytes values (a stack trace, a message) are encoded every time, so
#: that what is remembered stays under a megabyte.
_REMEMBER_LENGTH: Final = 128
_key_values: dict[tuple[int, str, type, Any], bytes] = {}
#: Value types whose encoding is remembered (str and bytes up to _REMEMBER_LENGTH).
_NUMBERS: Final = frozenset({bool, int, float})
_TEXTS: Final = frozenset({str, bytes})


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return bytes((n,))
    n &= 0xFFFFFFFFFFFFFFFF  # a negative int64 is its two's complement, 10 bytes
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) of a one-byte ``tag``."""
    size = len(payload)
    if size < 0x80:
        return bytes((tag, size)) + payload
    return bytes((tag,)) + _varint(size) + payload


def _string(tag: int, text: str | None) -> bytes:
    return _field(tag, text.encode()) if text else b""


def _any_value(value: Any) -> bytes:
    """An AnyValue's fields (a oneof: written even at its default)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(0x0A, value.encode())
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(0x3A, value)
    if isinstance(value, Sequence):
        return _field(0x2A, b"".join(_field(0x0A, _any_value(v)) for v in value))
    if isinstance(value, Mapping):
        pairs = b"".join(_field(0x0A, _key_value(str(k), v)) for k, v in value.items())
        return _field(0x32, pairs)
    raise TypeError(f"invalid type {type(value).__name__} of value {value!r}")


def _key_value(key: str, value: Any) -> bytes:
    return _field(0x0A, key.encode()) + _field(0x12, _any_value(value))


def _attributes(tag: int, attributes: Mapping[str, Any] | None) -> bytes:
    """Each attribute as a KeyValue field ``tag``; one of an unsupported type is left
    out (and logged), as the SDK does."""
    if not attributes:
        return b""
    parts = []
    for key, value in attributes.items():
        kind = type(value)
        remember = kind in _NUMBERS or (kind in _TEXTS and len(value) <= _REMEMBER_LENGTH)
        remembered = (tag, key, kind, value) if remember else None
        encoded = _key_values.get(remembered) if remembered is not None else None
        if encoded is None:
            try:  # a value protobuf cannot hold (a lone surrogate in a str, a set)
                encoded = _field(tag, _key_value(key, value))
            except Exception as e:
                log.error("tracing: attribute %r not exported: %s", key, e)
                continue
            if remembered is not None:
                if len(_key_values) >= _KEY_VALUES_MAX:
                    _key_values.clear()
                _key_values[remembered] = encoded
        parts.append(encoded)
    return b"".join(parts)


#: Span.kind, field 6: OTLP numbers the kinds from 1 (SPAN_KIND_INTERNAL), the API from 0.
_KINDS: Final = {kind: bytes((0x30, kind.value + 1)) for kind in SpanKind}
#: Status.code, field 3 (UNSET, 0, is the default: not written).
_CODES: Final = {code: bytes((0x18, code.value)) if code.value else b"" for code in StatusCode}


def _flags(parent: SpanContext | None) -> bytes:
    remote = parent is not None and parent.is_remote
    return _FIXED32(_HAS_IS_REMOTE | _IS_REMOTE if remote else _HAS_IS_REMOTE)


def _span(span: ReadableSpan) -> bytes:
    context = span.get_span_context()
    assert context is not None
    parent = span.parent
    parts = [
        b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + context.span_id.to_bytes(8, "big"),
    ]
    state = context.trace_state
    if state:
        parts.append(_string(0x1A, ",".join(f"{k}={v}" for k, v in state.items())))
    if parent:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    parts.append(_string(0x2A, span.name))
    parts.append(_KINDS[span.kind])
    if span.start_time:
        parts.append(b"\x39" + _FIXED64(span.start_time))
    if span.end_time:
        parts.append(b"\x41" + _FIXED64(span.end_time))
    parts.append(_attributes(0x4A, span.attributes))
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))
    for event in span.events:
        body = b"\x09" + _FIXED64(event.timestamp) if event.timestamp else b""
        body += _string(0x12, event.name) + _attributes(0x1A, event.attributes)
        if event.dropped_attributes:
            body += b"\x20" + _varint(event.dropped_attributes)
        parts.append(_field(0x5A, body))
    if span.dropped_events:
        parts.append(b"\x60" + _varint(span.dropped_events))
    for link in span.links:
        linked = link.context
        body = b"\x0a\x10" + linked.trace_id.to_bytes(16, "big")
        body += b"\x12\x08" + linked.span_id.to_bytes(8, "big")
        body += _attributes(0x22, link.attributes)
        if link.dropped_attributes:
            body += b"\x28" + _varint(link.dropped_attributes)
        body += b"\x35" + _flags(linked)
        parts.append(_field(0x6A, body))
    if span.dropped_links:
        parts.append(b"\x70" + _varint(span.dropped_links))
    status = span.status
    if status is not None:
        parts.append(_field(0x7A, _string(0x12, status.description) + _CODES[status.status_code]))
    parts.append(b"\x85\x01" + _flags(parent))  # field 16, fixed32
    return b"".join(parts)


def _scope(scope: InstrumentationScope | None) -> bytes:
    if scope is None:
        return b""
    return (
        _string(0x0A, scope.name)
        + _string(0x12, scope.version)
        + _attributes(0x1A, scope.attributes)
    )


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """``spans`` as the serialised ``ExportTraceServiceRequest`` of an OTLP export."""
    groups: dict[Resource, dict[InstrumentationScope | None, list[bytes]]] = {}
    resource: Resource | None = None
    scopes: dict[InstrumentationScope | None, list[bytes]] = {}
    for span in spans:
        # Looked up once per run of spans sharing a resource (a process's spans share
        # one): ``Resource.__hash__`` dumps every attribute to JSON on each call.
        if span.resource is not resource:
            resource = span.resource
            scopes = groups.setdefault(resource, {})
        scope = span.instrumentation_scope or None
        encoded = scopes.get(scope)
        if encoded is None:
            encoded = scopes[scope] = []
        encoded.append(_field(0x12, _span(span)))
    out = []
    for resource, scopes in groups.items():
        body = [_field(0x0A, _attributes(0x0A, resource.attributes))]
        for scope, encoded in scopes.items():
            scope_spans = _field(0x0A, _scope(scope)) + b"".join(encoded)
            if scope is not None:
                scope_spans += _string(0x1A, scope.schema_url)
            body.append(_field(0x12, scope_spans))
        body.append(_string(0x1A, resource.schema_url))
        out.append(_field(0x0A, b"".join(body)))
    return b"".join(out)
