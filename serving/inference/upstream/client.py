"""One upstream V2 server, as the gateway calls it: health, metadata, inference.

``UpstreamClient`` is what the pool and the remote backend use; the transport
behind it is chosen by the URL's scheme from ``CLIENTS`` (HTTP today; a gRPC
client is one more row). Every failure is a typed error: ``UpstreamUnavailable``
when no answer came (the batch may be retried elsewhere), the status-mapped
FermionError of the upstream's own ``{"error"}`` answer otherwise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from model_store.importer import import_from_string
from model_store.manifest import ModelManifest
from serving.config import RemoteSettings
from serving.errors import (
    DeadlineExceeded,
    FermionError,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    PayloadTooLarge,
    RateLimited,
)
from serving.inference.upstream.wire import UpstreamFailed

__all__ = [
    "CLIENTS",
    "UpstreamClient",
    "UpstreamUnavailable",
    "create_client",
    "error_for_status",
]

#: URL scheme -> "module:Class" of the client speaking to such an upstream.
CLIENTS: dict[str, str] = {
    "http": "serving.inference.upstream.http_client:HttpUpstreamClient",
    "https": "serving.inference.upstream.http_client:HttpUpstreamClient",
}


class UpstreamUnavailable(ModelNotReady):
    """No answer from the upstream: refused, reset, timed out, or 502/503 (503 here).

    The batch was not computed there (or its answer was lost), so another
    upstream, or the local replica, may compute it.
    """


class UpstreamClient(ABC):
    """Calls one upstream V2 server. Created and closed on the gateway's event loop."""

    def __init__(self, url: str, settings: RemoteSettings) -> None:
        self.url = url
        self.settings = settings

    @abstractmethod
    async def server_ready(self, timeout_s: float) -> bool:
        """True when the server says it is ready (``/v2/health/ready``)."""

    @abstractmethod
    async def model_ready(self, model: str, version: str, timeout_s: float) -> bool:
        """True when the server says this model version is ready."""

    @abstractmethod
    async def model_metadata(self, model: str, version: str, timeout_s: float) -> Any:
        """The V2 model metadata (decoded JSON)."""

    @abstractmethod
    async def model_config(self, model: str, version: str, timeout_s: float) -> Any | None:
        """The model's configuration where the server has one (Triton, Fermion), else None."""

    @abstractmethod
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
        """Compute one batch upstream: every output of ``manifest``."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connections."""


def create_client(url: str, settings: RemoteSettings) -> UpstreamClient:
    """The client for ``url``, by its scheme."""
    scheme = urlsplit(url).scheme
    spec = CLIENTS.get(scheme)
    if spec is None:
        raise ValueError(f"no upstream client for {scheme}:// URLs; known: {sorted(CLIENTS)}")
    client: UpstreamClient = import_from_string(spec)(url, settings)
    return client


#: An upstream's answer status -> the error this gateway answers with (same status).
_STATUS_ERRORS: dict[int, type[FermionError]] = {
    400: InvalidInput,
    404: ModelNotFound,
    413: PayloadTooLarge,
    500: InferenceFailed,
    504: DeadlineExceeded,
}


def error_for_status(status: int, message: str, *, retry_after_s: float = 1.0) -> FermionError:
    """The typed error for an upstream's non-200 answer.

    V2 statuses keep their meaning (400, 404, 413, 429, 500, 504); 502 and 503 mean
    the upstream could not compute it (UpstreamUnavailable); 401 and 403 are this
    gateway's credentials refused, and anything else a 502. Messages name no upstream
    address: clients see them.
    """
    detail = f"upstream answered {status}: {message}"
    if status in (502, 503):
        return UpstreamUnavailable(detail)
    if status == 429:
        return RateLimited(detail, retry_after_s=retry_after_s)
    if status in (401, 403):
        return UpstreamFailed(f"{detail} (check remote.headers)")
    error = _STATUS_ERRORS.get(status)
    return error(detail) if error is not None else UpstreamFailed(detail)
