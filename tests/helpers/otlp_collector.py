"""A loopback OTLP/HTTP traces receiver for tests, scripted status by status."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

__all__ = [
    "Collector",
    "GrpcCollector",
    "finished_spans",
    "otlp_collector",
    "otlp_grpc_collector",
    "service_names",
    "span_names",
]


def finished_spans(count: int) -> tuple[ReadableSpan, ...]:
    """``count`` ended SDK spans, ``request-0`` on, of one resource, to export."""
    memory = InMemorySpanExporter()
    resource = Resource.create({"service.name": "fermion-test", "deployment.environment": "ci"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("fermion")
    for i in range(count):
        with tracer.start_as_current_span(f"request-{i}", attributes={"fermion.model": "digits"}):
            pass
    provider.shutdown()
    return memory.get_finished_spans()


def span_names(received: list[ExportTraceServiceRequest]) -> list[str]:
    """The names of the spans in ``received``, in order."""
    return [
        span.name
        for message in received
        for rs in message.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]


def service_names(received: list[ExportTraceServiceRequest]) -> set[str]:
    """The ``service.name`` of every resource in ``received``."""
    return {
        attr.value.string_value
        for message in received
        for rs in message.resource_spans
        for attr in rs.resource.attributes
        if attr.key == "service.name"
    }


@dataclass
class Collector:
    """What the receiver got: each post's headers (lower-case names) and the client's
    address it came from, and the requests it answered 200. It answers its posts with
    ``statuses`` in turn, then 200; ``retry_after`` goes out with every answer but
    200 when set. With ``hang_up`` set it closes each connection once it has answered,
    without saying so (as a collector does with one it finds idle)."""

    statuses: list[int]
    received: list[ExportTraceServiceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)
    retry_after: str | None = None
    hang_up: bool = False
    url: str = ""


@contextmanager
def otlp_collector(*statuses: int, keep_alive: bool = False) -> Iterator[Collector]:
    """A receiver on 127.0.0.1 and a free port (``Collector.url``) until the block ends;
    HTTP/1.1 with connections kept open when ``keep_alive``, else HTTP/1.0."""
    collector = Collector(list(statuses))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            collector.headers.append({k.lower(): v for k, v in self.headers.items()})
            collector.peers.append(self.client_address)
            status = collector.statuses.pop(0) if collector.statuses else 200
            if status == 200:
                collector.received.append(ExportTraceServiceRequest.FromString(body))
            self.send_response(status)
            if status != 200 and collector.retry_after is not None:
                self.send_header("Retry-After", collector.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            if collector.hang_up:
                self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    collector.url = f"http://127.0.0.1:{server.server_port}/v1/traces"
    try:
        yield collector
    finally:
        server.shutdown()
        server.server_close()


class GrpcCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC traces receiver: each export's request and its metadata (a dict)."""

    def __init__(self) -> None:
        self.received: list[ExportTraceServiceRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.endpoint = ""

    def Export(
        self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ExportTraceServiceResponse:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
        self.received.append(request)
        return ExportTraceServiceResponse()


@contextmanager
def otlp_grpc_collector() -> Iterator[GrpcCollector]:
    """A receiver on 127.0.0.1 and a free port (``GrpcCollector.endpoint``, an
    ``http://`` URL: no TLS) until the block ends."""
    collector = GrpcCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    collector.endpoint = f"http://127.0.0.1:{port}"
    try:
        yield collector
    finally:
        server.stop(grace=None)
