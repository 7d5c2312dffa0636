"""OTLP/HTTP posts over one kept-open ``http.client`` connection.

A post through ``requests`` and urllib3 (the SDK's transport) takes 0.6-0.7 ms of the
exporter thread's CPU, holding the GIL for most of it: the session merges settings,
hooks and cookies, urllib3 checks its pool out and in, and both wrap the answer. For a
collector on plain HTTP, which needs none of that, ``PlainTransport`` writes the
request on a kept-open connection and reads the answer: about 0.2 ms. The SDK's
client still decides everything else (retries, backoff, ``Retry-After``,
compression, headers, timeouts); this is only the transport it is given, on the
SDK's own interface for one. Importing this module loads the SDK's exporter package.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from opentelemetry.exporter.http.transport._base import BaseHTTPResult, BaseHTTPTransport

__all__ = ["PlainResult", "PlainTransport"]


@dataclass(frozen=True, slots=True)
class PlainResult(BaseHTTPResult):
    """A response read whole, or the error that kept it from coming."""

    body: bytes = field(default=b"", repr=False)
    message: http.client.HTTPMessage | None = field(default=None, repr=False, compare=False)

    def content(self) -> bytes:
        return self.body

    def headers(self) -> Mapping[str, str]:
        """Lower-case names; a repeated header's values joined with ", "."""
        joined: dict[str, str] = {}
        if self.message is not None:
            for name, value in self.message.items():
                key = name.lower()
                joined[key] = f"{joined[key]}, {value}" if key in joined else value
        return joined


class PlainTransport(BaseHTTPTransport):
    """HTTP/1.1 requests to plain-HTTP URLs over one kept-open connection.

    A connection the peer says it will close, or one a request failed on, is dropped,
    and the next request connects anew. The SDK's client asks again at once after a
    connection error (what a kept-open connection the collector closed while idle
    gives) and backs off for the rest. Requests are sent one at a time. Once closed,
    it sends nothing more.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._connection: http.client.HTTPConnection | None = None
        self._origin: tuple[str, int] | None = None
        self._url = ""
        self._target = "/"

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        data: bytes | None = None,
    ) -> BaseHTTPResult:
        if timeout is not None and timeout <= 0:
            return PlainResult(error=TimeoutError("no time was left for the request"))
        with self._lock:
            if self._closed:
                return PlainResult(error=ConnectionAbortedError("the transport is closed"))
            try:
                return self._send(method, url, headers or {}, timeout, data)
            except Exception as e:  # any failure is the request's, as in the SDK's
                self._drop()
                return PlainResult(error=e)

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        timeout: float | None,
        data: bytes | None,
    ) -> PlainResult:
        if url != self._url:
            self._aim(url)
        connection = self._connection
        if connection is None:
            assert self._origin is not None
            host, port = self._origin
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
            self._connection = connection
        elif connection.sock is not None:
            connection.sock.settimeout(timeout)
        connection.request(method, self._target, body=data, headers=headers)
        response = connection.getresponse()
        body = response.read()
        if response.will_close:
            self._drop()
        return PlainResult(
            status_code=response.status, reason=response.reason, body=body, message=response.msg
        )

    def _aim(self, url: str) -> None:
        """Take ``url``'s path for the next requests, and its host's connection."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "http" or not parts.hostname:
            raise ValueError(f"not a plain HTTP URL: {url!r}")
        origin = (parts.hostname, parts.port or 80)
        if origin != self._origin:
            self._drop()
            self._origin = origin
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._url = url

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def is_connection_error(self, exception: Exception | None) -> bool:
        """Refused, reset, closed, timed out or not resolved (all ``OSError``), or an
        answer that is not HTTP: what the SDK's transports count as one."""
        return isinstance(exception, OSError | http.client.HTTPException)

    def close(self) -> None:
        """Drop the connection, a request in flight on it included: that request fails
        at once rather than when the collector answers or its timeout ends."""
        self._closed = True
        connection = self._connection
        sock = connection.sock if connection is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # wakes a thread blocked reading it
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._drop()
