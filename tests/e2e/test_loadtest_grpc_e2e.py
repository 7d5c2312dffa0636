"""``fermion loadtest --protocol grpc``: locust users and the open-loop engine over gRPC,
whose reports agree with the server's own statistics and name failed calls by status,
gRPC code and message."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_store.store import ModelStore
from tests.e2e.conftest import CONFIG
from tests.e2e.test_loadtest_e2e import check_counts, fermion, served
from tests.helpers.servers import RunningServer, start_server, stop_server

pytestmark = pytest.mark.e2e

#: Both engines, with what makes each run a few seconds long.
ENGINES = [("--users", "2"), ("--rate", "40/s")]


@pytest.fixture(scope="module")
def limited(
    demo_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A gateway serving gRPC that lets each caller infer 5 times a second."""
    config = CONFIG + "limits:\n  rate_limits: [{rate: 5, burst: 1}]\n"
    running = start_server(demo_store.root, tmp_path_factory.mktemp("limited"), config, grpc=True)
    yield running
    stop_server(running)


def test_distributed_grpc_run_reports_what_the_server_served(
    grpc_server: RunningServer, demo_store: ModelStore, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    before = served(grpc_server)
    done = fermion(
        "loadtest",
        *("--protocol", "grpc", "--url", f"grpc://{grpc_server.grpc_address}"),
        *("--model", "digits", "--store", str(demo_store.root), "--out", str(out)),
        *("--users", "4", "--duration", "3s", "--workers", "2", "--slo", "errors<1%"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2
    check_counts(summary, before, served(grpc_server))
    assert set(summary["versions"]) == {"2"}
    assert summary["config"]["samples"].endswith("samples.npz")
    assert summary["config"]["protocol"] == "grpc"


def test_open_loop_grpc_run_reports_what_the_server_served(
    grpc_server: RunningServer, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    before = served(grpc_server)
    done = fermion(
        "loadtest",
        *("--protocol", "grpc", "--url", f"grpc://{grpc_server.grpc_address}"),
        *("--model", "digits", "--model-version", "1", "--out", str(out)),
        *("--rate", "100/s", "--duration", "2s", "--workers", "2", "--slo", "errors<1%"),
        *("--metrics-url", f"{grpc_server.url}/metrics"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    sent = served(grpc_server)["1"] - before.get("1", 0) - 1  # one call checked the test first
    assert summary["check"] == {"status": 200, "version": "1"}
    assert summary["requests"] == sent == 200 and summary["failures"] == 0
    assert summary["generator"]["scheduled"] == summary["generator"]["sent"] == 200
    assert set(summary["versions"]) == {"1"}
    config = summary["config"]
    assert config["mode"] == "open loop" and config["protocol"] == "grpc"
    assert config["encoding"] == "raw" and config["workers"] == 2
    assert summary["server"]["versions"]["digits v1"]["requests"] == sent


@pytest.mark.parametrize("engine", ENGINES, ids=["locust", "open"])
def test_failed_grpc_calls_are_reported_by_status_and_message(
    limited: RunningServer, tmp_path: Path, engine: tuple[str, str]
) -> None:
    out = tmp_path / "report"
    before = served(limited)
    done = fermion(
        "loadtest",
        *("--protocol", "grpc", "--url", f"grpc://{limited.grpc_address}"),
        *("--model", "digits", *engine, "--duration", "2s", "--out", str(out)),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    answered = served(limited)["2"] - before.get("2", 0) - 1  # and the check before the load
    assert summary["requests"] - summary["failures"] == answered
    assert summary["failures"] > 0
    (error,) = summary["errors"]
    assert error["status"] == 429 and error["count"] == summary["failures"]
    assert error["message"].startswith("RESOURCE_EXHAUSTED: ")
    assert "error: 429 RESOURCE_EXHAUSTED: " in done.stdout


@pytest.mark.parametrize("engine", ENGINES, ids=["locust", "open"])
def test_a_grpc_call_the_model_refuses_fails_the_run_at_once(
    grpc_server: RunningServer, tmp_path: Path, engine: tuple[str, str]
) -> None:
    before = served(grpc_server)
    done = fermion(
        "loadtest",
        *("--protocol", "grpc", "--url", f"grpc://{grpc_server.grpc_address}"),
        *("--model", "digits", *engine, "--duration", "60s", "--batch-size", "100"),
        *("--out", str(tmp_path / "report")),
        timeout=30,  # not the 60 s the run asked for
    )  # a batch over the model's max batch size (64): every call would fail
    assert done.returncode == 2, done.stdout + done.stderr
    assert "the gateway refuses the test's requests" in done.stderr
    assert "400 INVALID_ARGUMENT: input 'input': batch of 100" in done.stderr
    assert served(grpc_server) == before
    assert not (tmp_path / "report" / "summary.json").exists()
