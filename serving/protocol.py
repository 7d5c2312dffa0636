"""The KServe V2 names every layer shares: the server's name and version, the infer path.

A foundation like ``config`` and ``errors``: no web framework, importable from any layer.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Final

__all__ = ["SERVER_NAME", "SERVER_VERSION", "parse_infer_path"]

#: The server name ``GET /v2`` reports.
SERVER_NAME: Final = "fermion"


def _installed_version() -> str:
    try:
        return version(SERVER_NAME)
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


#: The server version ``GET /v2`` reports: the installed package's.
SERVER_VERSION: Final = _installed_version()


def parse_infer_path(path: str) -> tuple[str, str | None] | None:
    """``(model, version)`` of ``/v2/models/{m}[/versions/{v}]/infer``, else None.

    ``version`` is None when the path names none. Each name is one non-empty path
    segment, as the V2 routes match it; any other shape is not an infer path.
    """
    parts = path.split("/")
    n = len(parts)
    if n == 5:
        if parts[0] == "" and parts[1] == "v2" and parts[2] == "models" and parts[4] == "infer":
            return (parts[3], None) if parts[3] else None
        return None
    if (
        n == 7
        and parts[0] == ""
        and parts[1] == "v2"
        and parts[2] == "models"
        and parts[4] == "versions"
        and parts[6] == "infer"
        and parts[3]
        and parts[5]
    ):
        return parts[3], parts[5]
    return None
