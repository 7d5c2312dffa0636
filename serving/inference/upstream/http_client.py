"""An upstream V2 server over HTTP/1.1 (aiohttp): kept-alive connections, binary tensors."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np
import orjson

from model_store.manifest import ModelManifest
from serving.config import RemoteSettings
from serving.inference.upstream.client import (
    UpstreamClient,
    UpstreamUnavailable,
    error_for_status,
)
from serving.inference.upstream.wire import decode_infer_response, encode_infer_request

__all__ = ["HttpUpstreamClient"]

#: Errors that mean no answer came back: the batch may be computed elsewhere.
_NO_ANSWER = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError)


class HttpUpstreamClient(UpstreamClient):
    """The V2 REST protocol with the binary tensor extension, over a pool of connections."""

    def __init__(self, url: str, settings: RemoteSettings) -> None:
        super().__init__(url, settings)
        self._session: aiohttp.ClientSession | None = None
        #: Health checks and metadata on connections of their own: a pool busy with
        #: slow batches must not make a working upstream look dead.
        self._checks: aiohttp.ClientSession | None = None

    def _new_session(self, connections: int) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=connections, keepalive_timeout=30.0, ttl_dns_cache=60
            ),
            headers=self.settings.headers,
            auto_decompress=False,
            # Answers are read as sent: asking for none compressed (aiohttp would offer
            # gzip, and a Fermion upstream gzips answers of 1 kB and more).
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = self._new_session(self.settings.pool_size)
        return self._session

    def _open_checks(self) -> aiohttp.ClientSession:
        if self._checks is None:
            self._checks = self._new_session(2)
        return self._checks

    def _path(self, model: str, version: str) -> str:
        path = f"{self.url}/v2/models/{quote(model, safe='')}"
        return f"{path}/versions/{quote(version, safe='')}" if version else path

    def _timeout(self, total_s: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=total_s, sock_connect=min(total_s, self.settings.connect_timeout_s)
        )

    async def _get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        try:
            async with self._open_checks().get(url, timeout=self._timeout(timeout_s)) as response:
                return response.status, await response.read()
        except TimeoutError:
            raise UpstreamUnavailable(f"no answer within {timeout_s:g}s") from None
        except _NO_ANSWER as e:
            raise UpstreamUnavailable(f"no answer: {_reason(e)}") from None

    async def server_ready(self, timeout_s: float) -> bool:
        status, _ = await self._get(f"{self.url}/v2/health/ready", timeout_s)
        return status == 200

    async def model_ready(self, model: str, version: str, timeout_s: float) -> bool:
        status, _ = await self._get(self._path(model, version) + "/ready", timeout_s)
        return status == 200

    async def model_metadata(self, model: str, version: str, timeout_s: float) -> Any:
        status, body = await self._get(self._path(model, version), timeout_s)
        if status != 200:
            raise error_for_status(status, _message(body))
        return _json(body)

    async def model_config(self, model: str, version: str, timeout_s: float) -> Any | None:
        status, body = await self._get(self._path(model, version) + "/config", timeout_s)
        if status in (404, 405, 501):
            return None
        if status != 200:
            raise error_for_status(status, _message(body))
        return _json(body)

    async def infer(
        self,
        model: str,
        version: str,
        manifest: ModelManifest,
        inputs: dict[str, np.ndarray],
        *,
        timeout_s: float,
        headers: Mapping[str, str],
    ) -> dict[str, np.ndarray]:
        body, wire_headers = encode_infer_request(inputs, manifest, binary=self.settings.binary)
        wire_headers.update(headers)
        url = self._path(model, version) + "/infer"
        try:
            async with self._open().post(
                url, data=body, headers=wire_headers, timeout=self._timeout(timeout_s)
            ) as response:
                raw = await response.read()
                status = response.status
                header_length = response.headers.get("inference-header-content-length")
                retry_after = response.headers.get("retry-after", "1")
        except TimeoutError:
            raise UpstreamUnavailable(f"no answer within {timeout_s:.3g}s") from None
        except _NO_ANSWER as e:
            raise UpstreamUnavailable(f"no answer: {_reason(e)}") from None
        if status != 200:
            raise error_for_status(
                status,
                _message(raw),
                retry_after_s=float(retry_after) if retry_after.isdigit() else 1.0,
            )
        return decode_infer_response(raw, header_length, manifest)

    async def close(self) -> None:
        sessions = (self._session, self._checks)
        self._session = self._checks = None
        for session in sessions:
            if session is not None:
                await session.close()
        # Let the connectors' transports finish closing before the loop moves on.
        await asyncio.sleep(0)


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _message(body: bytes) -> str:
    """The ``error`` of a V2 error body, or the body's start."""
    decoded = _json(body)
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
        text: str = decoded["error"]
    elif isinstance(decoded, dict) and isinstance(decoded.get("detail"), str):
        text = decoded["detail"]  # FastAPI's own errors (KServe's unknown routes)
    else:
        text = body[:200].decode(errors="replace")
    return text if len(text) <= 500 else text[:497] + "..."


def _reason(error: BaseException) -> str:
    """What went wrong, without the upstream's address (clients may read it)."""
    if isinstance(error, aiohttp.ClientConnectorError):
        return "cannot connect"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "connection closed before the answer"
    if isinstance(error, aiohttp.ClientPayloadError):
        return "answer cut short"
    return type(error).__name__
