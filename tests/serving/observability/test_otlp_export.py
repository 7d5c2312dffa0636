"""The OTLP/HTTP exporter: what it skips per post changes nothing it sends, and it sends
Fermion's encoding through the SDK's own client."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.sdk.trace.export import SpanExportResult

from serving.observability import otlp_export
from serving.observability.otlp_export import export_session, grpc_span_exporter, span_exporter
from tests.helpers.otlp_collector import (
    finished_spans,
    otlp_collector,
    otlp_grpc_collector,
    span_names,
)
from tests.helpers.spies import spy


def _clean_environment(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name in (
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "NETRC",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))


COLLECTOR = "http://collector.internal:4318/v1/traces"
TLS_COLLECTOR = "https://collector.internal:4318/v1/traces"
NETRC = "machine collector.internal login fermion password secret\n"


def test_the_session_skips_the_environment_only_where_it_holds_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _clean_environment(monkeypatch, tmp_path)
    for endpoint in (COLLECTOR, TLS_COLLECTOR):
        session = export_session(endpoint)
        assert session is not None and session.trust_env is False


@pytest.mark.parametrize(
    ("endpoint", "environment", "netrc"),
    [
        (COLLECTOR, {"REQUESTS_CA_BUNDLE": "/etc/ssl/company-ca.pem"}, None),  # no TLS
        (COLLECTOR, {"http_proxy": "http://proxy:3128", "no_proxy": "collector.internal"}, None),
        (COLLECTOR, {}, "machine elsewhere.internal login x password y\n"),
    ],
)
def test_settings_that_do_not_reach_the_collector_change_nothing(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    endpoint: str,
    environment: dict[str, str],
    netrc: str | None,
) -> None:
    _clean_environment(monkeypatch, tmp_path)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    if netrc is not None:
        (tmp_path / ".netrc").write_text(netrc)
    assert export_session(endpoint) is not None


@pytest.mark.parametrize(
    ("endpoint", "setting"),
    [
        (TLS_COLLECTOR, ("HTTPS_PROXY", "http://proxy.internal:3128")),
        (COLLECTOR, ("http_proxy", "http://proxy.internal:3128")),
        (COLLECTOR, ("all_proxy", "http://proxy.internal:3128")),
        (TLS_COLLECTOR, ("REQUESTS_CA_BUNDLE", "/etc/ssl/company-ca.pem")),
        (TLS_COLLECTOR, ("CURL_CA_BUNDLE", "/etc/ssl/company-ca.pem")),
        (COLLECTOR, ("NETRC", "secrets.netrc")),
        (COLLECTOR, (".netrc", "")),
    ],
)
def test_an_environment_requests_would_apply_keeps_the_exporters_own_session(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str, setting: tuple[str, str]
) -> None:
    _clean_environment(monkeypatch, tmp_path)
    name, value = setting
    if name == "NETRC":
        (tmp_path / value).write_text(NETRC)
        monkeypatch.setenv(name, str(tmp_path / value))
    elif name == ".netrc":
        (tmp_path / name).write_text(NETRC)
    else:
        monkeypatch.setenv(name, value)
    assert export_session(endpoint) is None


def test_the_exporter_posts_fermions_encoding_through_the_sdks_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoded = spy(monkeypatch, otlp_export, "encode_spans")
    spans = finished_spans(3)
    with otlp_collector() as collector:
        exporter = span_exporter(collector.url, {"x-tenant": "blue"})
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        exporter.shutdown()
    assert encoded == [spans]  # this SDK's client took Fermion's bytes: no fallback
    assert len(collector.received) == 1
    assert span_names(collector.received) == ["request-0", "request-1", "request-2"]
    assert collector.headers[0]["x-tenant"] == "blue"
    assert collector.headers[0]["content-type"] == "application/x-protobuf"


def test_the_grpc_exporter_sends_fermions_encoding_as_the_sdks_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoded = spy(monkeypatch, otlp_export, "encode_spans")
    spans = finished_spans(3)
    with otlp_grpc_collector() as collector:
        exporter = grpc_span_exporter(collector.endpoint, {"x-tenant": "blue"})
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        exporter.shutdown()
    assert encoded == [spans]  # this SDK took Fermion's encoding: no fallback
    assert collector.received == [sdk_encode(spans)]
    assert collector.metadata[0]["x-tenant"] == "blue"


def test_a_collector_that_is_briefly_unavailable_gets_the_batch_on_a_retry() -> None:
    with otlp_collector(503) as collector:
        exporter = span_exporter(collector.url, {})
        started = time.monotonic()
        assert exporter.export(finished_spans(2)) is SpanExportResult.SUCCESS
        waited = time.monotonic() - started
        exporter.shutdown()
    assert len(collector.headers) == 2 and len(collector.received) == 1
    assert waited < 5.0  # the SDK's first backoff, about a second


def test_a_collector_that_refuses_the_batch_is_not_asked_again() -> None:
    with otlp_collector(400) as collector:
        exporter = span_exporter(collector.url, {})
        assert exporter.export(finished_spans(2)) is SpanExportResult.FAILURE
        exporter.shutdown()
    assert len(collector.headers) == 1 and collector.received == []


def test_a_shut_down_exporter_sends_nothing() -> None:
    with otlp_collector() as collector:
        exporter = span_exporter(collector.url, {})
        exporter.shutdown()
        assert exporter.export(finished_spans(1)) is SpanExportResult.FAILURE
    assert collector.headers == []
