"""``fermion loadtest --protocol grpc``: the same locust scenario and report over gRPC, whose
per-version counts agree with the server's own statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_store.store import ModelStore
from tests.e2e.test_loadtest_e2e import check_counts, fermion, served
from tests.helpers.servers import RunningServer

pytestmark = pytest.mark.e2e


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


def test_failed_grpc_calls_are_reported_by_status_and_message(
    grpc_server: RunningServer, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    done = fermion(
        "loadtest",
        *("--protocol", "grpc", "--url", f"grpc://{grpc_server.grpc_address}"),
        *("--model", "digits", "--users", "2", "--duration", "1s", "--out", str(out)),
        *(
            "--batch-size",
            "100",
        ),  # over the max batch size
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == summary["failures"] > 0
    (error,) = summary["errors"]
    assert error["status"] == 400
    assert error["message"].startswith("INVALID_ARGUMENT: input 'input': batch of 100")
