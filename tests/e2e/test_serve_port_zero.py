"""``fermion serve --port 0`` (and ``--grpc-port 0``): the OS picks the port, and the server
says which once it listens.

And what it prints at start is true: nothing to serve is an error, a gateway that is not
ready says so and why.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient

from model_store.manifest import TensorSpec
from model_store.store import ArtifactSource, ModelStore
from tests.helpers.tiny_models import write_matmul_onnx

_REPO_ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"^Fermion listening on (http://127\.0\.0\.1:(\d+))$")
_GRPC_LISTENING = re.compile(r"^Fermion gRPC listening on (127\.0\.0\.1:(\d+))$")
_WAIT_S = 60.0


@dataclass
class _Served:
    process: subprocess.Popen[str]
    lines: queue.Queue[str]
    seen: list[str]

    def wait_for(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """The first line of the server's output matching ``pattern``."""
        for line in self.seen:
            if match := pattern.search(line):
                return match
        deadline = time.monotonic() + _WAIT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            self.seen.append(line)
            if match := pattern.search(line):
                return match
        raise AssertionError(f"no line matching {pattern.pattern!r} in:\n" + "\n".join(self.seen))


def _store(root: Path) -> ModelStore:
    store = ModelStore(root)
    onnx_path = root.parent / "matmul.onnx"
    write_matmul_onnx(onnx_path)
    store.publish(
        "matmul",
        platform="onnxruntime_onnx",
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 3])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 2])],
        max_batch_size=8,
        artifacts=[ArtifactSource("onnxruntime", onnx_path, file="model.ort.onnx")],
    )
    return store


def _serve(store: ModelStore, *args: str) -> Generator[_Served, None, None]:
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--store", str(store.root), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=_REPO_ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield _Served(process, lines, [])
    finally:
        process.send_signal(signal.SIGINT)  # SIGTERM would wait out server.drain_s
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=10)
        assert process.stdout is not None
        process.stdout.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[_Served]:
    yield from _serve(
        _store(tmp_path / "store"), "--host", "127.0.0.1", "--port", "0", "--grpc-port", "0"
    )


def test_port_0_listens_on_the_port_it_prints(served: _Served) -> None:
    url, port = served.wait_for(_LISTENING).groups()
    assert int(port) > 0
    live = httpx.get(f"{url}/v2/health/live", timeout=10.0)
    assert live.status_code == 200


def test_grpc_port_0_listens_on_the_port_it_prints(served: _Served) -> None:
    address, port = served.wait_for(_GRPC_LISTENING).groups()
    assert int(port) > 0
    client = grpcclient.InferenceServerClient(address)
    try:
        assert client.is_server_live()
    finally:
        client.close()


def test_the_start_banner_s_examples_use_the_real_port(served: _Served) -> None:
    url = served.wait_for(_LISTENING).group(1)
    ready = served.wait_for(re.compile(r"^Fermion is ready at (\S+)"))
    assert ready.group(1) == url
    # The curl example spans two lines: the URL, then (after a backslash) its body file.
    post = served.wait_for(re.compile(r"curl -s -X POST (\S+) \\$"))
    assert post.group(1) == f"{url}/v2/models/matmul/infer"
    body_file = served.wait_for(re.compile(r"-d @(\S+)$")).group(1)
    body = json.loads(Path(body_file).read_text())
    answer = httpx.post(post.group(1), json=body, timeout=10.0)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["name"] == "y"


def test_two_servers_on_port_0_get_ports_of_their_own(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    first = _serve(store, "--host", "127.0.0.1", "--port", "0", "--grpc-port", "0")
    second = _serve(store, "--host", "127.0.0.1", "--port", "0", "--grpc-port", "0")
    a, b = next(first), next(second)
    try:
        port_a = a.wait_for(_LISTENING).group(2)
        port_b = b.wait_for(_LISTENING).group(2)
        assert port_a != port_b
        grpc_a = a.wait_for(_GRPC_LISTENING).group(2)
        assert grpc_a != b.wait_for(_GRPC_LISTENING).group(2)
        assert grpc_a not in (port_a, port_b)
        for served in (a, b):
            url = served.wait_for(_LISTENING).group(1)
            assert httpx.get(f"{url}/v2/health/live", timeout=10.0).status_code == 200
    finally:
        first.close()
        second.close()


def test_a_port_in_use_is_refused_with_the_reason(served: _Served, tmp_path: Path) -> None:
    port = served.wait_for(_LISTENING).group(2)
    serve = [sys.executable, "-m", "serving.cli", "serve", "--store", str(tmp_path / "empty")]
    done = subprocess.run(
        [*serve, "--host", "127.0.0.1", "--port", port, "--grpc-port", "off", "--allow-empty"],
        capture_output=True,
        text=True,
        cwd=_REPO_ROOT,
        timeout=_WAIT_S,
    )
    assert done.returncode == 3
    assert f"fermion: cannot listen on 127.0.0.1:{port}" in done.stderr


def test_a_grpc_port_in_use_is_refused_with_the_reason(served: _Served, tmp_path: Path) -> None:
    port = served.wait_for(_GRPC_LISTENING).group(2)
    serve = [sys.executable, "-m", "serving.cli", "serve", "--store", str(tmp_path / "empty")]
    done = subprocess.run(
        [*serve, "--host", "127.0.0.1", "--port", "0", "--grpc-port", port, "--allow-empty"],
        capture_output=True,
        text=True,
        cwd=_REPO_ROOT,
        timeout=_WAIT_S,
    )
    assert done.returncode == 3
    assert f"fermion: cannot listen for gRPC on 127.0.0.1:{port}" in done.stderr


def test_nothing_to_serve_exits_2_unless_allowed(tmp_path: Path) -> None:
    serve = [sys.executable, "-m", "serving.cli", "serve", "--store", str(tmp_path / "typo")]
    done = subprocess.run(
        [*serve, "--host", "127.0.0.1", "--port", "0"],
        capture_output=True,
        text=True,
        cwd=_REPO_ROOT,
        timeout=_WAIT_S,
    )
    assert done.returncode == 2
    assert "nothing to serve" in done.stderr and "typo" in done.stderr
    allowed = _serve(
        ModelStore(tmp_path / "typo"), "--port", "0", "--grpc-port", "off", "--allow-empty"
    )
    served = next(allowed)
    try:
        url = served.wait_for(_LISTENING).group(1)
        banner = served.wait_for(re.compile(r"^Fermion is up at \S+ but NOT ready: (.*)$"))
        assert "does not exist" in banner.group(1)
        ready = httpx.get(f"{url}/v2/health/ready", timeout=10.0)
        assert ready.status_code == 503 and "does not exist" in ready.json()["reason"]
    finally:
        allowed.close()


def test_the_banner_says_not_ready_and_why(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    v2 = store.push(store.version_dir("matmul", 1))
    artifact = store.version_dir("matmul", v2.version) / v2.artifacts[0].file
    os.chmod(artifact, 0o644)
    artifact.write_bytes(artifact.read_bytes() + b"tampered")
    gen = _serve(store, "--host", "127.0.0.1", "--port", "0", "--grpc-port", "off")
    served = next(gen)
    try:
        url = served.wait_for(_LISTENING).group(1)
        banner = served.wait_for(re.compile(r"^Fermion is up at (\S+) but NOT ready: (.*)$"))
        assert banner.group(1) == url
        assert banner.group(2).startswith("matmul version 2 unavailable")
        # The examples that follow use the version that serves, and work.
        served.wait_for(re.compile(r"curl -s -X POST (\S+) \\$"))
        body = json.loads(Path(served.wait_for(re.compile(r"-d @(\S+)$")).group(1)).read_text())
        answer = httpx.post(f"{url}/v2/models/matmul/infer", json=body, timeout=10.0)
        assert answer.status_code == 200 and answer.headers["fermion-model-version"] == "1"
        assert not any(line.startswith("Fermion is ready") for line in served.seen)
    finally:
        gen.close()
