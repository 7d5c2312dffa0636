"""The OTLP/HTTP exporter's per-span and per-post savings change nothing it sends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from serving.observability.otlp_export import export_session, hashed_resource
from tests.helpers.spies import spy


def _resource() -> Resource:
    return Resource.create({"service.name": "fermion-test", "deployment.environment": "ci"})


def test_a_hashed_resource_is_equal_hashes_alike_and_never_rehashes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain = _resource()
    hashed = hashed_resource(plain)
    assert hashed == plain and plain == hashed
    assert hash(hashed) == hash(plain)
    assert dict(hashed.attributes) == dict(plain.attributes)
    assert hashed.schema_url == plain.schema_url
    calls = spy(monkeypatch, Resource, "__hash__")
    for _ in range(3):
        assert hash(hashed) == hash(plain)
    assert calls == [plain] * 3  # the plain one's, every time; the hashed one's never


def test_spans_of_a_hashed_resource_encode_as_the_plain_resources_would() -> None:
    plain = _resource()
    exported: dict[str, tuple[list[tuple[str, str]], list[str]]] = {}
    for label, resource in (("plain", plain), ("hashed", hashed_resource(plain))):
        memory = InMemorySpanExporter()
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(SimpleSpanProcessor(memory))
        tracer = provider.get_tracer("fermion")
        for _ in range(3):
            with (
                tracer.start_as_current_span("request", attributes={"fermion.model": "digits"}),
                tracer.start_as_current_span("fermion.execute"),
            ):
                pass
        message = encode_spans(memory.get_finished_spans())
        # All six spans under one resource, as the SDK groups them.
        assert len(message.resource_spans) == 1
        (group,) = message.resource_spans
        exported[label] = (
            sorted((a.key, a.value.string_value) for a in group.resource.attributes),
            [span.name for scope in group.scope_spans for span in scope.spans],
        )
        provider.shutdown()
    assert exported["hashed"] == exported["plain"]
    assert len(exported["plain"][1]) == 6


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
