"""Bad input: the right status and a clear error body, and the server stays healthy."""

from __future__ import annotations

import gzip
import socket
from collections.abc import Iterator, Mapping

import httpx
import numpy as np
import orjson
import pytest

from tests.e2e.conftest import MAX_BODY_BYTES
from tests.helpers.servers import RunningServer

ROW = np.linspace(0, 1, 784, dtype=np.float32)


def _json_body(**overrides: object) -> dict[str, object]:
    tensor: dict[str, object] = {
        "name": "input",
        "shape": [1, 1, 28, 28],
        "datatype": "FP32",
        "data": ROW.tolist(),
    }
    tensor.update(overrides)
    return {"inputs": [tensor]}


def _binary(header: Mapping[str, object], payload: bytes) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps(header)
    return head + payload, {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def _binary_header(size: int = 3136) -> dict[str, object]:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 1, 28, 28],
                "datatype": "FP32",
                "parameters": {"binary_data_size": size},
            }
        ]
    }


@pytest.fixture()
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
        # Whatever was sent, the server is still healthy and still right.
        assert client.get("/v2/health/ready").status_code == 200
        ok = client.post("/v2/models/digits/infer", json=_json_body())
        assert ok.status_code == 200, ok.text
        assert len(ok.json()["outputs"][0]["data"]) == 10


def _expect(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error, str) and error
    for fragment in fragments:
        assert fragment.lower() in error.lower(), error


URL = "/v2/models/digits/infer"


def test_invalid_json(http: httpx.Client) -> None:
    _expect(
        http.post(URL, content=b'{"inputs": [', headers={"content-type": "application/json"}), 400
    )


def test_wrong_datatype(http: httpx.Client) -> None:
    _expect(http.post(URL, json=_json_body(datatype="INT32")), 400, "input", "datatype")


def test_wrong_shape(http: httpx.Client) -> None:
    _expect(http.post(URL, json=_json_body(shape=[1, 784])), 400, "input", "shape")
    _expect(http.post(URL, json=_json_body(shape=[1, 1, 28, 27])), 400, "input")


def test_data_length_not_matching_shape(http: httpx.Client) -> None:
    _expect(http.post(URL, json=_json_body(data=ROW.tolist()[:-1])), 400, "input")


def test_non_numeric_data(http: httpx.Client) -> None:
    _expect(http.post(URL, json=_json_body(data=["x"] * 784)), 400, "input")


def test_truncated_binary_body(http: httpx.Client) -> None:
    body, headers = _binary(_binary_header(), ROW.tobytes()[:-100])
    _expect(http.post(URL, content=body, headers=headers), 400, "input")
    headers["Inference-Header-Content-Length"] = str(len(body) + 10)
    _expect(http.post(URL, content=body, headers=headers), 400)


def test_binary_data_size_not_matching(http: httpx.Client) -> None:
    body, headers = _binary(_binary_header(size=3000), ROW.tobytes())
    _expect(http.post(URL, content=body, headers=headers), 400, "input")


def test_unknown_input_and_output_names(http: httpx.Client) -> None:
    _expect(http.post(URL, json=_json_body(name="pixels")), 400, "pixels")
    body = _json_body() | {"outputs": [{"name": "probabilities"}]}
    _expect(http.post(URL, json=body), 400, "probabilities")


def test_unknown_model_and_version(http: httpx.Client) -> None:
    _expect(http.post("/v2/models/nosuch/infer", json=_json_body()), 404, "nosuch")
    _expect(http.post("/v2/models/digits/versions/99/infer", json=_json_body()), 404, "99")
    _expect(http.get("/v2/models/digits/versions/abc"), 404)
    _expect(http.get("/v2/models/nosuch"), 404)
    _expect(http.post("/v2/models/..%2F..%2Fetc/infer", json=_json_body()), 404)


def test_body_over_the_limit(http: httpx.Client) -> None:
    big = b"x" * (MAX_BODY_BYTES + 1)
    _expect(http.post(URL, content=big, headers={"content-type": "application/json"}), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        for _ in range(5):
            yield b" " * (MAX_BODY_BYTES // 4)

    _expect(http.post(URL, content=chunks()), 413)


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(
    server: RunningServer,
) -> None:
    """The 413 answers the headers: the server neither waits for nor reads the body."""
    declared = 100 * MAX_BODY_BYTES
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + b"[" * 4096)  # a sliver of the body; the rest is never sent
        status, headers, body = _read_response(sock)
        assert status == 413, body
        assert headers["connection"] == "close"
        error = orjson.loads(body)["error"]
        assert str(declared) in error, error
        # The server closes the connection rather than drain the 100 MiB it was promised.
        try:
            rest = sock.recv(1)
        except ConnectionResetError:
            rest = b""
        assert rest == b""


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: status, lower-cased headers, body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def test_gzip_bomb_is_refused(http: httpx.Client) -> None:
    bomb = gzip.compress(b" " * (MAX_BODY_BYTES * 4))
    headers = {"content-encoding": "gzip", "content-type": "application/json"}
    _expect(http.post(URL, content=bomb, headers=headers), 413)


def test_batch_over_max_batch_size(http: httpx.Client) -> None:
    rows = 65
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [rows, 1, 28, 28],
                "datatype": "FP32",
                "parameters": {"binary_data_size": rows * 3136},
            }
        ]
    }
    content, headers = _binary(body, np.zeros((rows, 784), np.float32).tobytes())
    _expect(http.post(URL, content=content, headers=headers), 400, "64")


def test_gzip_body_and_missing_content_type_work(http: httpx.Client) -> None:
    payload = orjson.dumps(_json_body() | {"id": "zip-1", "outputs": [{"name": "logits"}]})
    r = http.post(URL, content=gzip.compress(payload), headers={"content-encoding": "gzip"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "zip-1"
    plain = http.post(URL, content=payload)  # no Content-Type at all: treated as JSON
    assert plain.status_code == 200, plain.text
    assert plain.json()["outputs"] == r.json()["outputs"]


def test_request_id_header_round_trip(http: httpx.Client) -> None:
    r = http.get("/v2/health/live", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert http.get("/v2/health/live").headers["x-request-id"]


def test_repository_index_and_unload_load(http: httpx.Client) -> None:
    index = http.post("/v2/repository/index").json()
    assert {"name": "digits", "version": "2", "state": "READY"} in index
    _expect(http.post("/v2/repository/models/nosuch/load"), 404)
    assert http.post("/v2/repository/models/digits/unload").status_code == 200
    _expect(http.post(URL, json=_json_body()), 404, "digits")
    assert http.post("/v2/repository/models/digits/load").status_code == 200
    assert http.get("/v2/models/digits/ready").status_code == 200
