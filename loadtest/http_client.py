"""An HTTP/1.1 transport for the open-loop engine: keep-alive connections on asyncio streams.

Small on purpose: a load generator's own cost per request is part of what it measures,
so a request is one ``write`` of prebuilt bytes and a response is read by its
``content-length`` (or chunked encoding, or until the server closes). One request at a
time per connection (no pipelining); a connection is opened when none is idle, up to
``max_connections`` per target, and reused while the server keeps it alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from loadtest.gateway import fetch_metadata
from loadtest.payloads import (
    HEADER_LENGTH,
    VERSION_HEADER,
    Payload,
    error_message,
    infer_path,
    served_version,
)
from loadtest.transport import Call, Outcome, TransportOptions

__all__ = ["HttpTransport"]

_MAX_HEAD = 64 * 1024


class _Closed(Exception):
    """The server closed a reused connection before answering (safe to retry once)."""


@dataclass
class _Target:
    host: str
    port: int
    tls: ssl.SSLContext | None
    base: str
    host_header: str
    prefix: bytes
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    slots: asyncio.Semaphore | None = None


def _target(url: str, max_connections: int) -> _Target:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid gateway URL {url!r} (e.g. http://127.0.0.1:8000)")
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    port = parts.port or (443 if tls else 80)
    host_header = parts.netloc.rsplit("@", 1)[-1]
    return _Target(
        host=parts.hostname,
        port=port,
        tls=tls,
        base=parts.path.rstrip("/"),
        host_header=host_header,
        prefix=f"host: {host_header}\r\n".encode("latin-1"),
        slots=asyncio.Semaphore(max_connections),
    )


def _head_value(head: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in head:
        if key == name:
            return value
    return None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


class HttpTransport:
    """Sends V2 inference requests over HTTP/1.1 (plain or TLS) to one or more gateways."""

    def __init__(self, options: TransportOptions) -> None:
        if not options.targets:
            raise ValueError("no gateway URL")
        self._targets = [_target(u, options.max_connections) for u in options.targets]
        self._next = itertools.cycle(self._targets)
        self._headers = dict(options.headers)
        self._extra = b"".join(
            f"{k}: {v}\r\n".encode("latin-1") for k, v in options.headers.items()
        )
        self._timeout_s = options.timeout_s

    async def metadata(self, model: str, version: str | None) -> dict[str, Any]:
        """``GET /v2/models/{model}[/versions/{version}]`` of the first gateway."""
        base = self._targets[0]
        url = f"{'https' if base.tls else 'http'}://{base.host_header}{base.base}"
        return await asyncio.to_thread(fetch_metadata, url, model, version, self._headers)

    def calls(self, model: str, version: str | None, payloads: Sequence[Payload]) -> list[Call]:
        """One POST to the model's V2 infer path per payload."""
        path = infer_path(model, version)
        return [Call(path, p.body, tuple(p.headers.items())) for p in payloads]

    def _request_bytes(self, target: _Target, call: Call) -> bytes:
        head = [f"POST {target.base}{call.path} HTTP/1.1\r\n".encode("latin-1"), target.prefix]
        head += [f"{k}: {v}\r\n".encode("latin-1") for k, v in call.headers]
        head.append(self._extra)
        head.append(f"content-length: {len(call.body)}\r\n\r\n".encode("latin-1"))
        return b"".join(head) + call.body

    async def send(self, call: Call) -> Outcome:
        """Send ``call`` to the next gateway in turn; any failure is an ``Outcome``."""
        target = next(self._next)
        try:
            return await asyncio.wait_for(self._limited(target, call), self._timeout_s)
        except TimeoutError:
            return Outcome(0, error=f"0 timeout: no answer within {self._timeout_s:g}s")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            return Outcome(0, error=f"0 {type(e).__name__}: {e}")

    async def _limited(self, target: _Target, call: Call) -> Outcome:
        assert target.slots is not None
        async with target.slots:
            return await self._exchange(target, call)

    async def _exchange(self, target: _Target, call: Call) -> Outcome:
        data = self._request_bytes(target, call)
        while target.idle:
            conn = target.idle.pop()
            try:
                return await self._roundtrip(target, conn, data, reused=True)
            except _Closed:
                continue
        conn = await asyncio.open_connection(
            target.host, target.port, ssl=target.tls, limit=_MAX_HEAD
        )
        return await self._roundtrip(target, conn, data, reused=False)

    async def _roundtrip(
        self,
        target: _Target,
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        data: bytes,
        reused: bool,
    ) -> Outcome:
        reader, writer = conn
        keep = False
        try:
            writer.write(data)
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionResetError) as e:
                partial = getattr(e, "partial", b"")
                if reused and not partial:
                    raise _Closed from None
                raise
            status_line, *lines = raw[:-4].split(b"\r\n")
            status = int(status_line.split(b" ", 2)[1])
            head = []
            for line in lines:
                key, _, value = line.partition(b":")
                head.append((key.strip().lower(), value.strip()))
            length = _head_value(head, b"content-length")
            chunked = (_head_value(head, b"transfer-encoding") or b"").lower() == b"chunked"
            if length is not None:
                body = await reader.readexactly(int(length))
            elif chunked:
                body = await _read_chunked(reader)
            elif status in (204, 304) or 100 <= status < 200:
                body = b""
            else:
                body = await reader.read()
            keep = (length is not None or chunked) and (
                _head_value(head, b"connection") or b""
            ).lower() != b"close"
        finally:
            if keep:
                target.idle.append(conn)
            else:
                writer.close()
        if status == 200:
            header = _head_value(head, VERSION_HEADER.encode())
            size = _head_value(head, HEADER_LENGTH.encode())
            version = served_version(
                header.decode("latin-1") if header else None,
                body,
                size.decode("latin-1") if size else None,
            )
            return Outcome(200, version=version)
        return Outcome(status, error=error_message(status, body))

    async def aclose(self) -> None:
        """Close every idle connection."""
        for target in self._targets:
            while target.idle:
                _, writer = target.idle.pop()
                writer.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()
