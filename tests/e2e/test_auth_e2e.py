"""Auth on the real gateway: keys made and revoked by the CLI while it runs; the printed
examples work with the key; the access log names the key, never shows it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from model_store.store import ModelStore
from serving.cli.banner import usage_text
from tests.helpers.servers import REPO_ROOT, RunningServer, start_server, stop_server

pytestmark = pytest.mark.e2e


def _fermion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys") / "keys.json"


@pytest.fixture(scope="module")
def secured(
    demo_store: ModelStore, keys_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    config = f"server: {{access_log: true}}\nauth: {{keys_file: {keys_file}}}\n"
    server = start_server(demo_store.root, tmp_path_factory.mktemp("secured"), config)
    yield server
    stop_server(server)


def test_keys_made_and_revoked_on_a_running_gateway(
    secured: RunningServer, keys_file: Path, demo_store: ModelStore
) -> None:
    url = f"{secured.url}/v2/models/digits"
    assert httpx.get(url).status_code == 401  # no keys yet: everything but health is closed
    assert httpx.get(f"{secured.url}/v2/health/ready").status_code == 200

    made = _fermion(
        "keys", "create", "--name", "e2e", "--scopes", "infer:*,read", "--file", str(keys_file)
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key not in keys_file.read_text()
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(url, headers=headers).status_code == 200

    # The Python example printed at start works as printed, with the key.
    manifest = demo_store.manifest("digits", 2)
    text = usage_text(demo_store, manifest, secured.url, api_key=key)
    snippet = re.search(r"<<'PY'\n(.*?)\nPY", text, re.S)
    assert snippet is not None and f"Bearer {key}" in text
    run = subprocess.run(
        [sys.executable, "-c", snippet.group(1)], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stderr
    assert "argmax:" in run.stdout

    listed = _fermion("keys", "list", "--json", "--file", str(keys_file))
    assert [k["name"] for k in json.loads(listed.stdout)] == ["e2e"]
    revoked = _fermion("keys", "revoke", "e2e", "--file", str(keys_file))
    assert revoked.returncode == 0, revoked.stderr
    assert httpx.get(url, headers=headers).status_code == 401

    lines = [json.loads(line) for line in secured.log().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("key") == "e2e"]
    assert {line["path"] for line in mine} >= {"/v2/models/digits", "/v2/models/digits/infer"}
    assert all(line["request_id"] for line in mine)
    assert key not in secured.log()
