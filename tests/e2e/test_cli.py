"""The command line as an operator uses it: the admin commands authenticate, ``--version``,
and the same exit code for the same kind of failure in every command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_store.store import ModelStore
from serving.auth import create_key
from serving.protocol import SERVER_VERSION
from tests.helpers.servers import REPO_ROOT, RunningServer, start_server, stop_server

pytestmark = pytest.mark.e2e


def _fermion(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "FERMION_API_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=environ | (env or {}),
        timeout=120,
    )


@pytest.fixture(scope="module")
def secured(
    demo_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, str]]:
    tmp = tmp_path_factory.mktemp("cli")
    keys = tmp / "keys.json"
    admin = create_key(keys, "ops", ["admin"])
    config = f"auth:\n  keys_file: {keys}\nroutes:\n  digits:\n    split: {{1: 90, 2: 10}}\n"
    server = start_server(demo_store.root, tmp, config)
    yield server, admin
    stop_server(server)


def test_route_and_rollout_take_an_api_key(secured: tuple[RunningServer, str]) -> None:
    server, key = secured
    denied = _fermion("route", "show", "--url", server.url)
    assert denied.returncode == 2, denied.stderr
    assert "401" in denied.stderr and "FERMION_API_KEY" in denied.stderr
    shown = _fermion("route", "show", "--url", server.url, "--api-key", key)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "digits: v1 90.0%, v2 10.0%"
    from_env = _fermion("rollout", "status", "--url", server.url, env={"FERMION_API_KEY": key})
    assert from_env.returncode == 0, from_env.stderr
    assert "no rollout has run" in from_env.stdout
    wrong = _fermion("route", "show", "--url", server.url, "--api-key", "not-a-key")
    assert wrong.returncode == 2 and "401" in wrong.stderr


def test_version() -> None:
    done = _fermion("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"fermion {SERVER_VERSION}"


def test_the_same_failure_exits_the_same_way(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    # Something named that does not exist: 2, with the reason, in every command.
    for args in (
        ("models", "list", "--store", str(missing)),
        ("models", "show", "digits", "--store", str(missing)),
        ("keys", "revoke", "nobody", "--file", str(tmp_path / "keys.json")),
        ("serve", "--store", str(missing), "--port", "0"),
        ("models", "list", "--no-such-flag"),
    ):
        done = _fermion(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.strip(), args
    assert "no model store at" in _fermion("models", "list", "--store", str(missing)).stderr
    # A gateway that cannot be reached: the operation failed, 1.
    down = _fermion("route", "show", "--url", "http://127.0.0.1:9")
    assert down.returncode == 1 and "cannot reach the gateway" in down.stderr
