"""An OTLP/HTTP traces endpoint on loopback, for benches that export spans."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["SpanSink", "grpc_span_sink", "span_sink"]

_HOST = "127.0.0.1"


class SpanSink(http.server.BaseHTTPRequestHandler):
    """Answers every OTLP/HTTP export with 200 (the spans are counted, then dropped).

    HTTP/1.1, so an exporter's connection stays open between exports, as a collector's
    does; HTTP/1.0 (the handler's default) made every export connect anew.
    """

    protocol_version = "HTTP/1.1"
    received = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        self.rfile.read(length)
        type(self).received += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def span_sink() -> Iterator[str]:
    """The traces URL of a sink served on a thread of this process until the block ends."""
    server = http.server.ThreadingHTTPServer((_HOST, 0), SpanSink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{_HOST}:{server.server_address[1]}/v1/traces"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def grpc_span_sink() -> Iterator[str]:
    """The ``http://`` endpoint (no TLS) of an OTLP/gRPC traces sink served in this
    process until the block ends; it answers every export with success."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"{_HOST}:0")
    server.start()
    try:
        yield f"http://{_HOST}:{port}"
    finally:
        server.stop(grace=None)
