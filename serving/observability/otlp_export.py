"""The OTLP span exporters (HTTP and gRPC), with less work on their thread.

The batch processor's thread encodes and posts each batch of spans holding the GIL,
so every microsecond of it is one the event loop may wait for (up to a switch
interval at a time). Measured on the 2-core VM (``bench.gateway_overhead``, a
sampled request's 5 spans, 64 to an export): about 60-70 µs of that thread's CPU a
span with the SDK's exporter as it comes. Three places did work no export needs:

- The SDK's encoder builds a protobuf object per span, attribute and value, then
  serialises them: 30-40 µs a span, about 10 µs of it hashing the span's
  ``Resource`` to group the spans (``Resource.__hash__`` dumps every attribute to
  JSON). ``span_exporter`` writes the same message straight to bytes (``otlp_wire``,
  about 10 µs a span) and hands them to the SDK's own HTTP client, which keeps its
  retries, backoff, compression and TLS settings; ``grpc_span_exporter`` gives the
  SDK's gRPC exporter the message parsed back from them (about 1 µs a span more).
- ``requests`` looks the environment up on every post (proxies, CA bundles, netrc),
  about 0.7 ms an export. ``export_session`` turns that off, but only where the
  lookup would find nothing for the collector's URL, so nothing an export does
  changes. The environment is read once, when tracing is configured.
- Even without them, a post through ``requests`` and urllib3 took 0.6-0.7 ms (about
  11 µs of each span's 23). To a plain-HTTP collector the environment gives
  nothing, ``export_transport`` posts with ``otlp_transport.PlainTransport`` instead,
  on one kept-open ``http.client`` connection (about 0.2 ms). Over TLS, or where a
  proxy or netrc applies, ``requests`` posts as before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from serving.observability.otlp_wire import encode_spans

if TYPE_CHECKING:
    import requests
    from opentelemetry.exporter.http.transport._base import BaseHTTPTransport
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "export_session",
    "export_transport",
    "grpc_span_exporter",
    "otlp_exporter",
    "span_exporter",
]

log = logging.getLogger("fermion.tracing")

#: The variables ``requests`` takes a CA bundle from, for an https URL, when
#: ``trust_env`` is on.
_CA_BUNDLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def _environment_applies(endpoint: str) -> bool:
    """Whether ``requests`` would take anything from the environment for a post to
    ``endpoint``: a proxy, a CA bundle (https only) or netrc credentials."""
    from requests.utils import get_environ_proxies, get_netrc_auth

    if get_environ_proxies(endpoint) or get_netrc_auth(endpoint) is not None:
        return True
    tls = endpoint.lower().startswith("https:")
    return tls and any(os.environ.get(name) for name in _CA_BUNDLES)


def export_session(endpoint: str, *, environment: bool | None = None) -> requests.Session | None:
    """A session for the OTLP/HTTP exporter's posts to ``endpoint`` that skips
    ``requests``' per-post environment lookups, or None (the exporter's own) when the
    environment gives that endpoint a proxy, a CA bundle or netrc credentials, which
    the lookups would then apply. ``environment``: whether it does, where the caller
    has asked already (None: ask)."""
    if _environment_applies(endpoint) if environment is None else environment:
        return None
    import requests

    session = requests.Session()
    session.trust_env = False
    return session


def export_transport(endpoint: str, *, environment: bool | None = None) -> BaseHTTPTransport | None:
    """A ``PlainTransport`` for the OTLP/HTTP exporter's posts to ``endpoint``, or None
    where ``requests`` must post: an https endpoint (certificates, client keys), an
    environment that gives the endpoint a proxy or netrc credentials, or an SDK without
    the transport interface. ``environment``: as for ``export_session``."""
    if urlsplit(endpoint).scheme.lower() != "http":
        return None
    if _environment_applies(endpoint) if environment is None else environment:
        return None
    try:
        from serving.observability.otlp_transport import PlainTransport
    except ImportError:  # an SDK before its transport interface
        return None
    return PlainTransport()


def span_exporter(endpoint: str, headers: Mapping[str, str]) -> SpanExporter:
    """The SDK's OTLP/HTTP span exporter for ``endpoint``, encoding with ``otlp_wire``.

    Everything but the encoding is the SDK's: its settings from the environment
    (timeout, compression, certificates), its HTTP client with retries and backoff,
    its shutdown. Its request size limit (64 MiB) and its own opt-in metrics are
    skipped: an export here is 64 spans. Where the SDK has no ``_client`` with an
    ``export`` of serialised bytes (other versions), its own ``export`` runs.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    class _WireExporter(OTLPSpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            send = getattr(getattr(self, "_client", None), "export", None)
            if send is None or getattr(self, "_shutdown", True):
                return super().export(spans)
            try:
                data = encode_spans(spans)
            except Exception as e:  # a span the encoder cannot write: drop this batch
                log.error("tracing: %d spans not exported: %s", len(spans), e)
                return SpanExportResult.FAILURE
            if getattr(send(data), "success", False):
                return SpanExportResult.SUCCESS
            return SpanExportResult.FAILURE

    environment = _environment_applies(endpoint)  # (netrc is read: once is enough)
    transport = export_transport(endpoint, environment=environment)
    if transport is not None:
        try:
            return _WireExporter(endpoint=endpoint, headers=dict(headers), _transport=transport)
        except TypeError:  # an SDK whose exporter takes no transport
            transport.close()
    session = export_session(endpoint, environment=environment)
    return _WireExporter(endpoint=endpoint, headers=dict(headers), session=session)


def otlp_exporter(kind: str, endpoint: str, headers: Mapping[str, str]) -> SpanExporter:
    """The exporter of ``tracing.exporter`` ``kind`` (``otlp-grpc``, else OTLP/HTTP)."""
    if kind == "otlp-grpc":
        return grpc_span_exporter(endpoint, headers)
    return span_exporter(endpoint, headers)


def grpc_span_exporter(endpoint: str, headers: Mapping[str, str]) -> SpanExporter:
    """The SDK's OTLP/gRPC span exporter for ``endpoint`` (TLS for ``https://``),
    encoding with ``otlp_wire``.

    The SDK's stub sends a protobuf message, so the request is parsed back from
    Fermion's bytes, then serialised again by gRPC, both in protobuf's C code: about
    10 µs a span in all against the SDK's 34 (a message built field by field in
    Python). Everything else is the SDK's: channel, credentials, retries on the codes
    it retries, compression, timeout, ``OTEL_EXPORTER_OTLP_*`` settings. On an SDK
    without ``_translate_data`` the SDK's own encoding runs.
    """
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    class _WireGrpcExporter(OTLPSpanExporter):
        def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
            return ExportTraceServiceRequest.FromString(encode_spans(data))

    return _WireGrpcExporter(
        endpoint=endpoint,
        insecure=not endpoint.lower().startswith("https://"),
        headers=dict(headers),
    )
