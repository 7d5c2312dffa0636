"""A loopback OTLP/HTTP traces receiver for tests, scripted status by status."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

__all__ = ["Collector", "otlp_collector"]


@dataclass
class Collector:
    """What the receiver got: each post's headers (lower-case names) and the requests
    it answered 200; it answers its posts with ``statuses`` in turn, then 200."""

    statuses: list[int]
    received: list[ExportTraceServiceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""


@contextmanager
def otlp_collector(*statuses: int) -> Iterator[Collector]:
    """A receiver on 127.0.0.1 and a free port (``Collector.url``) until the block ends."""
    collector = Collector(list(statuses))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            collector.headers.append({k.lower(): v for k, v in self.headers.items()})
            status = collector.statuses.pop(0) if collector.statuses else 200
            if status == 200:
                collector.received.append(ExportTraceServiceRequest.FromString(body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    collector.url = f"http://127.0.0.1:{server.server_port}/v1/traces"
    try:
        yield collector
    finally:
        server.shutdown()
        server.server_close()
