"""Compressed bodies both ways, as tritonclient offers them: deflate or gzip requests,
gzip answers when the client accepts them (and only then)."""

from __future__ import annotations

import zlib

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from tests.helpers.inprocess import digits_body
from tests.helpers.servers import RunningServer

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("request_encoding", ["deflate", "gzip"])
def test_tritonclient_compressed_requests_and_answers(
    server: RunningServer, request_encoding: str
) -> None:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    x = triton.InferInput("input", [2, 1, 28, 28], "FP32")
    x.set_data_from_numpy(np.zeros((2, 1, 28, 28), np.float32), binary_data=True)
    plain = client.infer("digits", [x])
    packed = client.infer(
        "digits",
        [x],
        request_compression_algorithm=request_encoding,
        response_compression_algorithm="gzip",
    )
    assert np.array_equal(packed.as_numpy("logits"), plain.as_numpy("logits"))


def test_gzip_answers_only_when_asked(server: RunningServer) -> None:
    body = orjson.dumps(digits_body(rows=32))
    url = f"{server.url}/v2/models/digits/infer"
    with httpx.Client(timeout=30) as client:
        raw = client.post(url, content=body, headers={"accept-encoding": "identity"})
        packed = client.post(url, content=body, headers={"accept-encoding": "gzip, br"})
        refused = client.post(url, content=body, headers={"accept-encoding": "gzip;q=0"})
        metrics = client.get(f"{server.url}/metrics", headers={"accept-encoding": "gzip"})
        deflated = client.post(
            url,
            content=zlib.compress(body),
            headers={"content-encoding": "deflate", "accept-encoding": "identity"},
        )
    assert raw.status_code == packed.status_code == refused.status_code == 200
    assert "content-encoding" not in raw.headers and "content-encoding" not in refused.headers
    assert packed.headers["content-encoding"] == "gzip"
    assert packed.headers["vary"] == "Accept-Encoding"
    # httpx inflates it; the bytes on the wire were gzip and smaller.
    assert packed.json()["outputs"] == raw.json()["outputs"]
    assert int(packed.headers["content-length"]) < len(raw.content)
    assert packed.headers["fermion-model-version"] == raw.headers["fermion-model-version"]
    assert (
        metrics.headers["content-encoding"] == "gzip" and "fermion_requests_total" in metrics.text
    )
    assert deflated.status_code == 200 and deflated.json()["outputs"] == raw.json()["outputs"]
