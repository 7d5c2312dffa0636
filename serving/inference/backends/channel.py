"""Fermion's own channel from a gateway to a Ray replica: one batch per round trip, over TCP.

Ray Serve's handle costs about 1.6 ms per batch at one request at a time, 0.05 ms of it
the model (``bench/ray_hop.py``): its router, gRPC stubs and pickling on both sides.
This channel is a socket per in-flight batch between the gateway's event loop and a
thread of the replica, and a frame each way:

    frame    = u64 length (little-endian) | payload
    payload  = u32 header length | header (JSON) | the tensors' bytes, one after another
    header   = {"t": [[name, dtype, shape, nbytes], ...], ...metadata}

A numeric tensor's dtype is numpy's little-endian type string (``<f4``, ``|b1``,
``<i8``); an object tensor of bytes or of str elements is ``bytes`` or ``str``, each
element after its u32 length. Nothing is unpickled, so a frame can only ever become
arrays of plain numbers and strings. A connection's first frame is a hello carrying
the replica's token (handed out through the Ray cluster, see ``backends.ray``); a
connection without it is closed unread.

No Ray import here: ``backends.ray`` runs the server in each replica and the client
in the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, cast

import numpy as np
import orjson

from serving.errors import InvalidInput
from serving.inference.tensors import bytes_elements, elements, serialize_bytes

__all__ = [
    "ChannelDraining",
    "ChannelError",
    "ChannelGone",
    "ChannelServer",
    "ChannelUnreachable",
    "FrameError",
    "ReplicaChannel",
    "decode",
    "encode",
]

log = logging.getLogger("fermion.backends.channel")

_LENGTH: Final = struct.Struct("<Q")
_U32: Final = struct.Struct("<I")
#: The largest frame either side reads (a batch of any size a replica computes).
MAX_FRAME: Final = 1 << 36
#: The largest hello: a connection that has not shown its token reads no more.
MAX_HELLO: Final = 4096
#: Longest wait for a connection and its hello's answer (and, on the replica, for a
#: new connection's hello).
CONNECT_TIMEOUT_S: Final = 2.0
#: Connections one replica keeps at once; more are closed unread (gateways open at
#: most ``max_ongoing_requests`` each).
MAX_CONNECTIONS: Final = 1024
#: Below this many bytes an answer's parts are joined and sent in one write.
_JOIN_BELOW: Final = 64 * 1024
_DTYPE: Final = re.compile(r"[<|][biufc][0-9]{1,2}")

Run = Callable[[dict[str, np.ndarray], dict[str, str] | None], dict[str, np.ndarray]]


class FrameError(ValueError):
    """A frame that is not what this module writes."""


class ChannelGone(ConnectionError):
    """The connection to the replica failed or closed before the answer came."""


class ChannelUnreachable(ChannelGone):
    """No connection could be made (nothing was sent): the replica is gone or unreachable."""


class ChannelDraining(ChannelUnreachable):
    """The replica is shutting down and computed nothing: the batch can go elsewhere."""


class ChannelError(RuntimeError):
    """The replica could not compute the batch; the message is its error's first line."""


# -- frames ----------------------------------------------------------------------------------


def encode(tensors: Mapping[str, np.ndarray], **meta: Any) -> list[bytes | memoryview]:
    """The frame of ``tensors`` and ``meta`` (JSON values), as parts to write in order."""
    specs: list[list[Any]] = []
    parts: list[bytes | memoryview] = []
    size = 0
    for name, value in tensors.items():
        arr = np.asarray(value)
        shape = list(arr.shape)
        if arr.dtype.kind in "biufc":
            arr = np.ascontiguousarray(arr)  # (1-d for a 0-d array: its shape is kept above)
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            dtype = arr.dtype.str
            raw: bytes | memoryview = arr.reshape(-1).view(np.uint8).data
        elif arr.dtype.kind in "OSU":
            dtype, raw = _strings(name, arr)
        else:
            raise FrameError(f"tensor {name!r}: dtype {arr.dtype} cannot cross the channel")
        specs.append([name, dtype, shape, len(raw)])
        parts.append(raw)
        size += len(raw)
    header = orjson.dumps({"t": specs, **meta})
    length = _U32.size + len(header) + size
    return [_LENGTH.pack(length) + _U32.pack(len(header)) + header, *parts]


def _strings(name: str, arr: np.ndarray) -> tuple[str, bytes]:
    """The kind (``str`` or ``bytes``) of an object tensor, and its elements as V2's
    binary BYTES data."""
    items = elements(arr)
    if all(isinstance(x, str) for x in items):
        kind = "str"
    elif all(isinstance(x, bytes) for x in items):
        kind = "bytes"
    else:
        raise FrameError(f"tensor {name!r}: an object tensor must hold only bytes or only str")
    return kind, serialize_bytes(arr, name)


def decode(
    payload: bytes | bytearray | memoryview, offset: int = 0
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The metadata and tensors of a frame's payload (from ``offset``); arrays are views of it."""
    view = memoryview(payload)[offset:]
    try:
        if len(view) < _U32.size:
            raise FrameError("payload shorter than its header length")
        (head,) = _U32.unpack_from(view)
        pos = _U32.size + head
        if pos > len(view):
            raise FrameError("header runs past the payload")
        header = orjson.loads(view[_U32.size : pos])
        if not isinstance(header, dict) or not isinstance(header.get("t"), list):
            raise FrameError("header is not an object with a tensor list")
        tensors: dict[str, np.ndarray] = {}
        for spec in header.pop("t"):
            name, dtype, shape, nbytes = _spec(spec)
            if pos + nbytes > len(view):
                raise FrameError(f"tensor {name!r} runs past the payload")
            raw = view[pos : pos + nbytes]
            pos += nbytes
            tensors[name] = _tensor(name, dtype, shape, raw)
        if pos != len(view):
            raise FrameError(f"{len(view) - pos} bytes left over after the tensors")
    except orjson.JSONDecodeError as e:
        raise FrameError(f"header is not JSON: {e}") from None
    return header, tensors


def _spec(spec: Any) -> tuple[str, str, list[int], int]:
    if not (isinstance(spec, list) and len(spec) == 4):
        raise FrameError("a tensor spec is not [name, dtype, shape, nbytes]")
    name, dtype, shape, nbytes = spec
    if not (
        isinstance(name, str)
        and isinstance(dtype, str)
        and isinstance(shape, list)
        and all(type(d) is int and d >= 0 for d in shape)
        and type(nbytes) is int
        and nbytes >= 0
    ):
        raise FrameError(f"bad tensor spec {spec!r:.200}")
    return name, dtype, shape, nbytes


def _tensor(name: str, dtype: str, shape: list[int], raw: memoryview) -> np.ndarray:
    count = math.prod(shape)
    if dtype in ("str", "bytes"):
        return _from_strings(name, dtype, shape, count, raw)
    if not _DTYPE.fullmatch(dtype):
        raise FrameError(f"tensor {name!r}: dtype {dtype!r} is not a little-endian number type")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise FrameError(f"tensor {name!r}: unknown dtype {dtype!r}") from None
    if count * dt.itemsize != len(raw):
        raise FrameError(f"tensor {name!r}: {len(raw)} bytes for shape {shape} of {dtype}")
    return np.frombuffer(raw, dtype=dt, count=count).reshape(shape)


def _from_strings(
    name: str, kind: str, shape: list[int], count: int, raw: memoryview
) -> np.ndarray:
    try:
        out = bytes_elements(raw, count, name)
    except InvalidInput as e:
        raise FrameError(f"tensor {name!r}: {e}") from None
    if kind == "str":
        for i, item in enumerate(out):
            try:
                out[i] = item.decode("utf-8")
            except UnicodeDecodeError:
                raise FrameError(f"tensor {name!r}: element {i} is not UTF-8") from None
    return out.reshape(shape)


# -- the replica's side ----------------------------------------------------------------------


class ChannelServer:
    """A replica's listener: a thread per connection computes its batches with ``run``.

    ``run(inputs, carrier)`` computes one batch (``carrier``: the gateway's trace
    context); its exception goes back as the answer's error, and the connection stays.
    """

    def __init__(
        self,
        run: Run,
        *,
        host: str,
        token: str,
        hello_timeout_s: float = CONNECT_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run = run
        self._clock = clock
        self._token = token.encode()
        self._hello_timeout_s = hello_timeout_s
        self._max_connections = max_connections
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # a node's IPv6 address
        self._listener = socket.create_server((host, 0), family=family)
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        #: Notified when a batch is answered or a connection closes (see ``drain``).
        self._changed = threading.Condition(self._lock)
        self._connections: set[socket.socket] = set()
        self._closed = False
        self._draining = False
        #: Batches being computed (or waiting for the replica), and their count integrated
        #: over time since ``load`` last read it.
        self._batches = 0
        self._batch_seconds = 0.0
        self._counted_at = self._load_since = clock()
        self._thread = threading.Thread(target=self._accept, name="fermion-channel", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop accepting; each connection closes once its batch in progress is answered."""
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        self._stop_listening()
        for conn in connections:
            _shut(conn, socket.SHUT_RD)  # its thread reads EOF next

    @property
    def in_progress(self) -> int:
        """Batches being computed, or waiting for the replica, now."""
        return self._batches

    @property
    def draining(self) -> bool:
        """Whether ``drain`` was called: batches are sent back uncomputed."""
        return self._draining

    def _stop_listening(self) -> None:
        _shut(self._listener)  # wakes the accept
        self._listener.close()

    def drain(self, *, quiet_s: float, timeout_s: float) -> bool:
        """Take no more batches, and wait for the gateways to go; then ``close`` it.

        New connections are refused, and a batch that arrives from now on is answered
        "draining" uncomputed, which sends it to another replica at once (it costs its
        request no retry). Returns once the batches in progress are answered and every
        gateway closed its connections, or, with connections still open, ``quiet_s``
        after the start (gateways that had nothing to send meanwhile drop the replica
        when they next read the offers); at most ``timeout_s``. False: batches were
        still in progress then.
        """
        started = time.monotonic()
        with self._lock:
            self._draining = True
        self._stop_listening()
        with self._changed:
            while self._batches or self._connections:
                waited = time.monotonic() - started
                limit = timeout_s if self._batches else min(quiet_s, timeout_s)
                if waited >= limit:
                    break
                self._changed.wait(limit - waited)
            return self._batches == 0

    def load(self) -> float:
        """The mean number of batches in progress since the last call (or the start)."""
        with self._lock:
            now = self._clock()
            self._count(now)
            elapsed, seconds, batches = now - self._load_since, self._batch_seconds, self._batches
            self._batch_seconds, self._load_since = 0.0, now
        return seconds / elapsed if elapsed > 0 else float(batches)

    def _count(self, now: float) -> None:
        """Integrate the batches in progress up to ``now`` (with the lock held)."""
        self._batch_seconds += self._batches * (now - self._counted_at)
        self._counted_at = now

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                if len(self._connections) >= self._max_connections:
                    conn.close()
                    log.warning(
                        "channel: %d connections open, one more closed", len(self._connections)
                    )
                    continue
                self._connections.add(conn)
            threading.Thread(
                target=self._serve, args=(conn,), name="fermion-channel-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self._hello_timeout_s)  # a silent connection holds no thread
            hello = _recv_frame(conn, MAX_HELLO)
            if hello is None:
                return
            meta, _ = decode(hello)
            token = meta.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self._token):
                log.warning("channel: a connection without this replica's token was closed")
                return
            conn.settimeout(None)  # a gateway's connection waits for its next batch
            _send(conn, encode({}, ok=True))
            while (frame := _recv_frame(conn, MAX_FRAME)) is not None:
                _send(conn, self._answer(frame))
        except (OSError, FrameError) as e:
            log.debug("channel: connection closed: %s", e)
        finally:
            with self._changed:
                self._connections.discard(conn)
                self._changed.notify_all()
            conn.close()

    def _answer(self, frame: bytearray) -> list[bytes | memoryview]:
        with self._lock:
            if self._draining:
                return encode({}, d=True)
            self._count(self._clock())
            self._batches += 1
        try:
            return self._compute(frame)
        finally:
            with self._changed:
                self._count(self._clock())
                self._batches -= 1
                self._changed.notify_all()

    def _compute(self, frame: bytearray) -> list[bytes | memoryview]:
        meta, inputs = decode(frame)  # a bad frame closes the connection (FrameError)
        sent = meta.get("c")
        carrier = None
        if isinstance(sent, dict):
            carrier = {k: v for k, v in sent.items() if isinstance(v, str)}
        try:
            outputs = self._run(inputs, carrier)
            return encode(outputs)
        except Exception as e:
            text = str(e).strip()
            return encode({}, e=text.splitlines()[0] if text else type(e).__name__)


def _shut(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    with contextlib.suppress(OSError):  # not connected, or closed already
        sock.shutdown(how)


def _recv_frame(conn: socket.socket, limit: int) -> bytearray | None:
    """The next frame's payload; None at a clean EOF between frames."""
    head = _recv_exactly(conn, _LENGTH.size, eof_ok=True)
    if head is None:
        return None
    (length,) = _LENGTH.unpack(head)
    if length > limit:
        raise FrameError(f"a frame of {length} bytes is over the {limit} allowed")
    payload = _recv_exactly(conn, length, eof_ok=False)
    assert payload is not None
    return payload


def _recv_exactly(conn: socket.socket, n: int, *, eof_ok: bool) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            if eof_ok and got == 0:
                return None
            raise FrameError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


def _send(conn: socket.socket, parts: list[bytes | memoryview]) -> None:
    if sum(len(p) for p in parts) < _JOIN_BELOW:
        conn.sendall(b"".join(parts))
        return
    for part in parts:
        conn.sendall(part)


# -- the gateway's side ----------------------------------------------------------------------


class _Link(asyncio.Protocol):
    """One connection: one frame out, one frame back, at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._need = -1
        self._waiter: asyncio.Future[bytearray] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not a subclass of asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ChannelGone(f"connection lost: {exc or 'closed by the replica'}"))

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.close()  # nothing was asked: not this channel's peer
            return
        self._buf += data
        if self._need < 0:
            if len(self._buf) < _LENGTH.size:
                return
            (length,) = _LENGTH.unpack_from(self._buf)
            if length > MAX_FRAME:
                waiter.set_exception(ChannelGone(f"a frame of {length} bytes is too long"))
                self.close()
                return
            self._need = _LENGTH.size + length
        if len(self._buf) < self._need:
            return
        if len(self._buf) > self._need:
            waiter.set_exception(ChannelGone("the replica sent more than one answer"))
            self.close()
            return
        frame, self._buf, self._need = self._buf, bytearray(), -1
        waiter.set_result(frame)

    async def exchange(self, parts: list[bytes | memoryview]) -> bytearray:
        """Send one frame; its answer's frame (the length prefix included)."""
        if self.closed or self.transport is None:
            raise ChannelGone("connection closed")
        waiter: asyncio.Future[bytearray] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            self.transport.writelines(parts)
            return await waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class ReplicaChannel:
    """The gateway's connections to one replica: a connection per batch in flight.

    At most ``limit`` batches at once (the replica's ``max_ongoing_requests``); a
    connection a batch was cancelled on (a deadline, a timeout) is closed, since its
    answer may still come.
    """

    def __init__(self, replica: str, address: str, token: str, limit: int) -> None:
        self.replica = replica
        self.address = address
        self.limit = limit
        self.in_flight = 0
        self._token = token
        self._idle: list[_Link] = []
        self._closed = False

    async def call(
        self, inputs: Mapping[str, np.ndarray], carrier: Mapping[str, str] | None = None
    ) -> dict[str, np.ndarray]:
        """Compute ``inputs`` on the replica.

        Raises ``ChannelGone`` when the connection fails (the replica died, or closes),
        ``ChannelError`` when the replica's computation raised.
        """
        parts = encode(inputs, c=dict(carrier)) if carrier else encode(inputs)
        self.in_flight += 1
        try:
            link = self._take_idle() or await self._connect()
            try:
                frame = await link.exchange(parts)
            except BaseException:
                link.close()
                raise
            if self._closed:
                link.close()
            else:
                self._idle.append(link)
        finally:
            self.in_flight -= 1
        try:
            meta, outputs = decode(frame, _LENGTH.size)
        except FrameError as e:
            raise ChannelGone(f"unreadable answer: {e}") from None
        error = meta.get("e")
        if error is not None:
            raise ChannelError(str(error))
        if meta.get("d") is True:
            raise ChannelDraining(f"replica {self.replica} is shutting down")
        return outputs

    def _take_idle(self) -> _Link | None:
        while self._idle:
            link = self._idle.pop()
            if not link.closed:
                return link
        return None

    async def _connect(self) -> _Link:
        host, _, port = self.address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, link = await loop.create_connection(_Link, host, int(port))
                try:
                    frame = await link.exchange(encode({}, token=self._token))
                    meta, _ = decode(frame, _LENGTH.size)
                except BaseException:
                    link.close()
                    raise
        except TimeoutError:
            raise ChannelUnreachable(
                f"no hello from {self.address} in {CONNECT_TIMEOUT_S:g}s"
            ) from None
        except (OSError, FrameError) as e:
            raise ChannelUnreachable(f"cannot connect to {self.address}: {e}") from None
        if meta.get("ok") is not True:
            link.close()
            raise ChannelUnreachable(f"{self.address} refused the hello")
        return link

    def close(self) -> None:
        """Close the idle connections; those in use close when their batch ends."""
        self._closed = True
        for link in self._idle:
            link.close()
        self._idle.clear()
