"""Clients that misbehave before authentication cost the gateway nothing it needs.

Request heads are limited as they arrive (431), heads and bodies that trickle are cut
off at their timeouts (408, closed), protocol errors are V2 error bodies, and slow
connections that exhaust the descriptors are all closed in time for others to be served.
"""

from __future__ import annotations

import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_store.store import ModelStore
from tests.helpers.raw_http import (
    error_of,
    exchange,
    read_response,
    rss_mb,
    start_on_port_zero,
    wait_until,
)
from tests.helpers.servers import RunningServer, stop_server

pytestmark = pytest.mark.e2e

_TIMEOUT_S = 1.0
_CONFIG = f"""
server:
  header_timeout_s: {_TIMEOUT_S}
  body_timeout_s: {_TIMEOUT_S}
  max_header_bytes: 32768
  max_headers: 50
"""


@pytest.fixture(scope="module")
def gateway(
    demo_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    server = start_on_port_zero(demo_store.root, tmp_path_factory.mktemp("hostile"), _CONFIG)
    yield server
    stop_server(server)


def _big_head_attack(port: int, megabytes: int) -> int:
    """Send a request head with a header of ``megabytes`` MiB; the MiB sent before refusal."""
    chunk = b"a" * (1 << 20)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\nX-Big: ")
            for _ in range(megabytes):
                sock.sendall(chunk)
                sent += 1
        except OSError:
            pass
    return sent


def test_an_oversized_head_is_refused_as_it_arrives_with_431(gateway: RunningServer) -> None:
    head = b"GET /v2 HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    status, headers, body = exchange(gateway.port, head)
    assert status == 431
    assert headers["content-type"] == "application/json"
    assert error_of(body) == "request head over the limit of 32768 bytes"
    many = b"GET /v2 HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(60)) + b"\r\n"
    status, _, body = exchange(gateway.port, many)
    assert (status, error_of(body)) == (431, "more than 50 request headers")
    # A head just under both limits is served.
    fits = b"GET /v2 HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 30_000 + b"\r\n\r\n"
    assert exchange(gateway.port, fits)[0] == 200


def test_twenty_50_mb_heads_cost_the_gateway_no_memory(gateway: RunningServer) -> None:
    before = rss_mb(gateway.process.pid)
    sent: list[int] = []
    threads = [
        threading.Thread(target=lambda: sent.append(_big_head_attack(gateway.port, 50)))
        for _ in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each was cut off long before its 50 MB, and the gateway holds (at most) one read
    # buffer per connection past the limit: 20 x 50 MB cost well under 64 MB.
    assert len(sent) == 20 and max(sent) < 50, sent
    assert rss_mb(gateway.process.pid, "VmHWM") - before < 64
    assert exchange(gateway.port, b"GET /v2 HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 200


def _closed_after(sock: socket.socket, since: float) -> tuple[float, int, bytes]:
    """Seconds from ``since`` until the server closed ``sock``; the status and body it sent."""
    status, _, body = read_response(sock)
    while sock.recv(65536):
        pass
    return time.monotonic() - since, status, body


def test_trickled_heads_and_bodies_are_cut_off_at_their_timeouts(gateway: RunningServer) -> None:
    requests = {
        "silent": b"",
        "partial head": b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\n",
        "short body": (
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{"
        ),
    }
    answers = {}
    for what, data in requests.items():
        # The socket's own timeout is ten times longer: the server must be the one to close.
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10 * _TIMEOUT_S) as s:
            sent = time.monotonic()
            s.sendall(data)
            elapsed, status, body = _closed_after(s, sent)
        assert elapsed >= 0.9 * _TIMEOUT_S, what
        answers[what] = (status, error_of(body) if body else "")
    assert answers == {
        "silent": (0, ""),  # nothing was asked: nothing is answered
        "partial head": (408, "request head not received within 1 s"),
        "short body": (408, "request body not received: nothing came for 1 s"),
    }


def test_a_malformed_request_gets_a_v2_error_body(gateway: RunningServer) -> None:
    status, headers, body = exchange(gateway.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert (status, headers["content-type"]) == (400, "application/json")
    assert error_of(body) == "invalid HTTP request"


def _probe(port: int) -> bool:
    status, _, _ = exchange(
        port, b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 1.0
    )
    return status == 200


def test_slow_connections_past_the_descriptor_limit_are_all_closed_in_time(
    demo_store: ModelStore, tmp_path: Path
) -> None:
    """1,100 connections that never finish their head, on a gateway allowed 1,024 files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 4096)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    slow_count = 1100 if wanted >= 1400 else wanted - 300
    server_files = 1024 if slow_count == 1100 else slow_count - 76
    header_timeout = 1.5
    server = start_on_port_zero(
        demo_store.root,
        tmp_path,
        f"server:\n  header_timeout_s: {header_timeout}\n",
        open_files=server_files,
    )
    probes: list[tuple[float, bool]] = []
    stop = threading.Event()

    def prober() -> None:
        while not stop.is_set():
            probes.append((time.monotonic(), _probe(server.port)))
            time.sleep(0.05)

    selector = selectors.DefaultSelector()
    try:
        for _ in range(slow_count):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n")
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        opened = time.monotonic()
        thread = threading.Thread(target=prober)
        thread.start()
        closed = 0
        last_closed = opened
        while closed < slow_count and time.monotonic() - opened < 20 * header_timeout:
            for key, _ in selector.select(0.2):
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                closed += 1
                last_closed = time.monotonic()
        # Every slow connection was closed by the server: those it could accept at its
        # header timeout, the rest as soon as descriptors were free again.
        assert closed == slow_count
        wait_until(lambda: any(t > last_closed + 1.0 for t, _ in probes), 10, "probes after")
        stop.set()
        thread.join()
        after = [ok for t, ok in probes if t > last_closed]
        assert sum(after) >= 0.9 * len(after), probes
        assert server.process.poll() is None
    finally:
        stop.set()
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        stop_server(server)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
