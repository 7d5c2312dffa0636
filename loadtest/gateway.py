"""Plain HTTP GETs to a gateway outside the load itself: the model's metadata before a
run and ``/metrics`` around it (urllib: nothing to install, nothing shared with the load)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

__all__ = ["GatewayError", "auth_headers", "fetch_metadata", "fetch_text", "model_path"]


class GatewayError(RuntimeError):
    """A GET to the gateway failed; the message says which URL and why."""


def auth_headers(api_key_env: str) -> dict[str, str]:
    """``Authorization: Bearer <key>`` when the variable ``api_key_env`` is set, else none."""
    key = os.environ.get(api_key_env, "") if api_key_env else ""
    return {"authorization": f"Bearer {key}"} if key else {}


def model_path(model: str, version: str | None = None) -> str:
    """``/v2/models/{model}[/versions/{version}]``."""
    path = f"/v2/models/{model}"
    return f"{path}/versions/{version}" if version else path


def fetch_text(url: str, headers: Mapping[str, str] | None = None, timeout_s: float = 10) -> str:
    """The body of ``GET url`` (GatewayError with the status and body's start otherwise)."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            data: bytes = response.read()
            return data.decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        body = e.read()[:300].decode("utf-8", errors="replace")
        raise GatewayError(f"GET {url}: HTTP {e.code} {body}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise GatewayError(f"GET {url}: {e}") from None


def fetch_metadata(
    url: str, model: str, version: str | None, headers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The V2 metadata of ``model`` (one ``version``) from the gateway at ``url``."""
    full = url.rstrip("/") + model_path(model, version)
    text = fetch_text(full, headers, timeout_s=30)
    try:
        data = json.loads(text)
    except ValueError:
        raise GatewayError(f"GET {full}: not JSON: {text[:200]}") from None
    if not isinstance(data, dict):
        raise GatewayError(f"GET {full}: not a model's metadata: {text[:200]}")
    return data
