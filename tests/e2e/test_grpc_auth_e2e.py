"""Auth over gRPC on the real gateway: the same keys, scopes and answers as over HTTP, the
credential in ``authorization: Bearer`` or ``x-api-key`` metadata."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from model_store.store import ModelStore
from serving.auth import create_key
from tests.helpers.servers import RunningServer, start_server, stop_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("grpc-keys") / "keys.json"
    made = {
        "infer": create_key(path, "infer-digits", ["infer:digits"]),
        "read": create_key(path, "reader", ["read"]),
        "admin": create_key(path, "ops", ["admin"]),
        "other": create_key(path, "other-model", ["infer:other*", "read"]),
    }
    return path, made


@pytest.fixture(scope="module")
def secured(
    demo_store: ModelStore,
    keys: tuple[Path, dict[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningServer]:
    config = f"auth: {{keys_file: {keys[0]}}}\n"
    server = start_server(
        demo_store.root, tmp_path_factory.mktemp("grpc-secured"), config, grpc=True
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(secured: RunningServer) -> Iterator[grpcclient.InferenceServerClient]:
    assert secured.grpc_address is not None
    c = grpcclient.InferenceServerClient(secured.grpc_address)
    yield c
    c.close()


def _infer(client: grpcclient.InferenceServerClient, headers: dict[str, str]) -> Any:
    x = grpcclient.InferInput("input", [1, 1, 28, 28], "FP32")
    x.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    return client.infer("digits", [x], headers=headers)


def _status(call: Callable[[], Any]) -> str:
    try:
        call()
    except InferenceServerException as e:
        return f"{e.status()} {e.message()}"
    return "OK"


def test_the_auth_matrix(
    client: grpcclient.InferenceServerClient, keys: tuple[Path, dict[str, str]]
) -> None:
    made = keys[1]

    def bearer(name: str) -> dict[str, str]:
        return {"authorization": f"Bearer {made[name]}"}

    def header(name: str) -> dict[str, str]:
        return {"x-api-key": made[name]}

    unauthenticated = "StatusCode.UNAUTHENTICATED missing or invalid credentials"
    # Health probes are open, as over HTTP.
    assert client.is_server_live() and client.is_server_ready()
    assert _status(lambda: client.get_model_metadata("digits")) == unauthenticated
    assert _status(lambda: _infer(client, {})) == unauthenticated
    assert _status(lambda: _infer(client, {"authorization": "Bearer fmn_nope"})) == unauthenticated
    assert _status(lambda: _infer(client, {"authorization": "Basic abc"})) == unauthenticated
    # An infer:digits key, in either place.
    assert _infer(client, bearer("infer")).as_numpy("logits").shape == (1, 10)
    assert _infer(client, header("infer")).as_numpy("logits").shape == (1, 10)
    denied = "StatusCode.PERMISSION_DENIED this credential lacks the scope"
    assert _status(lambda: client.get_model_metadata("digits", headers=bearer("infer"))) == (
        f"{denied} read"
    )
    # read: metadata and config, not inference; infer:other*: not this model.
    assert _status(lambda: client.get_model_metadata("digits", headers=bearer("read"))) == "OK"
    assert _status(lambda: client.get_model_config("digits", headers=header("read"))) == "OK"
    assert _status(lambda: _infer(client, bearer("read"))) == f"{denied} infer:digits"
    assert _status(lambda: _infer(client, bearer("other"))) == f"{denied} infer:digits"

    # The repository needs admin.
    def index(headers: dict[str, str]) -> Callable[[], Any]:
        return lambda: client.get_model_repository_index(headers=headers)

    assert _status(index(bearer("read"))) == f"{denied} admin"
    assert _status(index(bearer("admin"))) == "OK"


def test_rejections_are_counted_as_over_http(
    secured: RunningServer, client: grpcclient.InferenceServerClient
) -> None:
    def rejected(reason: str) -> float:
        text = httpx.get(f"{secured.url}/metrics").text
        for line in text.splitlines():
            labels = f'reason="{reason}"' in line and 'model="digits"' in line
            if line.startswith("fermion_rejected_requests_total{") and labels:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = rejected("unauthenticated")
    _status(lambda: _infer(client, {}))
    assert rejected("unauthenticated") - before == 1
