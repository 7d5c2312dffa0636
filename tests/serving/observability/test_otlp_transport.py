"""``PlainTransport``: the OTLP/HTTP exporter's posts to a plain-HTTP collector, over
one kept-open connection, with the SDK's client still deciding retries and backoff."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SpanExportResult

from serving.observability import otlp_export
from serving.observability.otlp_export import export_transport, span_exporter
from serving.observability.otlp_transport import PlainTransport
from tests.helpers.otlp_collector import finished_spans, otlp_collector, span_names
from tests.helpers.spies import spy


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name in ("NETRC", "REQUESTS_CA_BUNDLE"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.mark.usefixtures("clean_environment")
def test_a_plain_http_collector_gets_every_export_over_one_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    posted = spy(monkeypatch, PlainTransport, "request")
    with otlp_collector(keep_alive=True) as collector:
        exporter = span_exporter(collector.url, {"x-tenant": "blue"})
        for _ in range(3):
            assert exporter.export(finished_spans(2)) is SpanExportResult.SUCCESS
        exporter.shutdown()
    assert len(posted) == 3  # this SDK took the transport: no silent fallback
    assert len(collector.received) == 3 and len(set(collector.peers)) == 1
    assert span_names(collector.received) == ["request-0", "request-1"] * 3
    assert collector.headers[0]["x-tenant"] == "blue"
    assert collector.headers[0]["content-type"] == "application/x-protobuf"


@pytest.mark.usefixtures("clean_environment")
def test_a_collector_that_closes_each_connection_gets_each_export_on_a_new_one() -> None:
    with otlp_collector() as collector:  # HTTP/1.0: it says so
        exporter = span_exporter(collector.url, {})
        for _ in range(3):
            assert exporter.export(finished_spans(1)) is SpanExportResult.SUCCESS
        exporter.shutdown()
    assert len(collector.received) == 3 and len(set(collector.peers)) == 3


@pytest.mark.usefixtures("clean_environment")
def test_a_connection_the_collector_closed_unannounced_costs_no_backoff() -> None:
    with otlp_collector(keep_alive=True) as collector:
        collector.hang_up = True
        exporter = span_exporter(collector.url, {})
        assert exporter.export(finished_spans(1)) is SpanExportResult.SUCCESS
        time.sleep(0.05)  # the collector has closed the connection it kept open
        started = time.monotonic()
        assert exporter.export(finished_spans(1)) is SpanExportResult.SUCCESS
        waited = time.monotonic() - started
        exporter.shutdown()
    assert len(collector.received) == 2 and len(set(collector.peers)) == 2
    assert waited < 0.5  # asked again at once on a new connection, not after a backoff


@pytest.mark.usefixtures("clean_environment")
def test_the_sdks_client_reads_retry_after_from_the_answer() -> None:
    with otlp_collector(503, keep_alive=True) as collector:
        collector.retry_after = "0"
        exporter = span_exporter(collector.url, {})
        started = time.monotonic()
        assert exporter.export(finished_spans(1)) is SpanExportResult.SUCCESS
        waited = time.monotonic() - started
        exporter.shutdown()
    assert len(collector.headers) == 2 and len(collector.received) == 1
    assert waited < 0.5  # Retry-After: 0, where the SDK's own first backoff is 0.8-1.2 s


def test_a_repeated_header_reads_as_one_value_whatever_its_case() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(5)

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nX-Why: a\r\n"
                    b"x-why: b\r\nContent-Length: 4\r\n\r\nslow"
                )

        thread = threading.Thread(target=answer)
        thread.start()
        transport = PlainTransport()
        url = f"http://127.0.0.1:{server.getsockname()[1]}/v1/traces"
        result = transport.request("POST", url, data=b"x", timeout=5)
        thread.join()
        transport.close()
    assert (result.status_code, result.reason, result.error) == (429, "Too Many Requests", None)
    assert result.content() == b"slow"
    assert result.headers()["retry-after"] == "3"
    assert result.headers()["x-why"] == "a, b"


def test_no_collector_is_a_connection_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    transport = PlainTransport()  # the port is closed now
    result = transport.request("POST", f"http://127.0.0.1:{port}/v1/traces", data=b"x", timeout=2)
    assert result.status_code is None and isinstance(result.error, ConnectionRefusedError)
    assert transport.is_connection_error(result.error)
    transport.close()


def test_a_collector_that_never_answers_times_out_and_is_left() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:  # listens, never reads
        url = f"http://127.0.0.1:{server.getsockname()[1]}/v1/traces"
        transport = PlainTransport()
        started = time.monotonic()
        result = transport.request("POST", url, data=b"x", timeout=0.2)
        waited = time.monotonic() - started
        assert isinstance(result.error, TimeoutError) and transport.is_connection_error(
            result.error
        )
        assert 0.15 < waited < 2.0
        no_time = transport.request("POST", url, data=b"x", timeout=0.0)
        assert isinstance(no_time.error, TimeoutError)
        transport.close()


def test_closing_fails_a_request_in_flight_at_once_and_sends_nothing_more() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:  # accepts, never answers
        url = f"http://127.0.0.1:{server.getsockname()[1]}/v1/traces"
        transport = PlainTransport()
        results: list[object] = []
        posting = threading.Thread(
            target=lambda: results.append(transport.request("POST", url, data=b"x", timeout=30))
        )
        posting.start()
        server.settimeout(5)
        accepted, _ = server.accept()
        with accepted:
            time.sleep(0.1)  # the request is sent, its answer awaited
            started = time.monotonic()
            transport.close()
            posting.join(timeout=5)
            waited = time.monotonic() - started
        assert not posting.is_alive() and waited < 2.0  # not the request's 30 s
        (result,) = results
        assert result.status_code is None and result.error is not None  # type: ignore[attr-defined]
        after = transport.request("POST", url, data=b"x", timeout=1)
        assert isinstance(after.error, ConnectionAbortedError)
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()  # no connection was made for it


def test_a_url_that_is_not_plain_http_is_an_error_not_a_post() -> None:
    transport = PlainTransport()
    result = transport.request("POST", "https://collector.internal/v1/traces", data=b"x")
    assert isinstance(result.error, ValueError) and not transport.is_connection_error(result.error)


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(
    ("endpoint", "setting"),
    [
        ("https://collector.internal:4318/v1/traces", None),
        ("http://collector.internal:4318/v1/traces", ("http_proxy", "http://proxy:3128")),
        ("http://collector.internal:4318/v1/traces", ("all_proxy", "http://proxy:3128")),
        ("http://collector.internal:4318/v1/traces", ("NETRC", "netrc")),
    ],
)
def test_tls_a_proxy_or_netrc_leave_the_posts_to_requests(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    endpoint: str,
    setting: tuple[str, str] | None,
) -> None:
    if setting is not None:
        name, value = setting
        if name == "NETRC":
            (tmp_path / value).write_text("machine collector.internal login a password b\n")
            value = str(tmp_path / value)
        monkeypatch.setenv(name, value)
    assert export_transport(endpoint) is None
    exporter = span_exporter(endpoint, {})
    try:
        assert not isinstance(exporter._client._transport, PlainTransport)  # type: ignore[attr-defined]
    finally:
        exporter.shutdown()


@pytest.mark.usefixtures("clean_environment")
def test_a_proxy_the_collector_is_exempt_from_keeps_the_plain_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("http_proxy", "http://proxy:3128")
    monkeypatch.setenv("no_proxy", "collector.internal")
    assert isinstance(export_transport("http://collector.internal:4318/v1/traces"), PlainTransport)


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize("proxy", [None, "http://proxy:3128"], ids=["plain", "behind a proxy"])
def test_the_exporter_asks_the_environment_once(
    monkeypatch: pytest.MonkeyPatch, proxy: str | None
) -> None:
    if proxy is not None:  # requests must post: the transport, then the session, decline
        monkeypatch.setenv("http_proxy", proxy)
    asked = spy(monkeypatch, otlp_export, "_environment_applies")
    endpoint = "http://collector.internal:4318/v1/traces"
    span_exporter(endpoint, {}).shutdown()
    assert asked == [endpoint]
