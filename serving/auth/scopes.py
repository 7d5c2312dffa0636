"""Scopes: what a credential may do, and what each request needs.

``infer:<model glob>`` runs inference on matching models, ``read`` reads
metadata, config and statistics, ``admin`` manages the repository, routes and
rollouts (and implies ``read``). Health probes need nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fnmatch import fnmatchcase

from serving.protocol import parse_infer_path

__all__ = [
    "ADMIN",
    "INFER",
    "OPEN",
    "READ",
    "Principal",
    "infer_model",
    "parse_scopes",
    "required_scope",
]

OPEN = "open"
READ = "read"
ADMIN = "admin"
INFER = "infer"

#: Paths no credential is needed for.
_OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
#: Path prefixes that need ``admin`` (the repository extension and the admin API).
_ADMIN_PREFIXES = ("/admin", "/v2/repository")
_GLOB = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,128}$")
_CACHE_LIMIT = 1024


def infer_model(method: str, path: str) -> str | None:
    """The model an inference request names (``POST /v2/models/{m}[/versions/{v}]/infer``)."""
    if method != "POST":
        return None
    parsed = parse_infer_path(path)
    return None if parsed is None else parsed[0]


def required_scope(method: str, path: str) -> tuple[str, str]:
    """``(kind, model)`` a request needs: kind is open, read, admin or infer."""
    if path in _OPEN_PATHS:
        return OPEN, ""
    if path.startswith(_ADMIN_PREFIXES):
        return ADMIN, ""
    model = infer_model(method, path)
    if model is not None:
        return INFER, model
    return READ, ""


def parse_scopes(scopes: Iterable[str], *, strict: bool = True) -> tuple[str, ...]:
    """Validated scopes; ``strict`` raises ValueError on an unknown one, else drops it."""
    out: list[str] = []
    for raw in scopes:
        scope = raw.strip()
        if not scope:
            continue
        known = scope in (READ, ADMIN) or (
            scope.startswith(INFER + ":") and _GLOB.match(scope[len(INFER) + 1 :]) is not None
        )
        if known:
            out.append(scope)
        elif strict:
            raise ValueError(f"unknown scope {scope!r}: use infer:<model glob>, read or admin")
    return tuple(dict.fromkeys(out))


class Principal:
    """An authenticated caller: a name for logs and rate limits, and its scopes."""

    __slots__ = ("_globs", "_infer", "admin", "expires_at", "name", "read", "scopes")

    def __init__(self, name: str, scopes: Iterable[str], expires_at: float | None = None) -> None:
        self.name = name
        self.scopes = parse_scopes(scopes, strict=False)
        #: Unix time after which the credential is refused (None: never).
        self.expires_at = expires_at
        self.admin = ADMIN in self.scopes
        self.read = self.admin or READ in self.scopes
        self._globs = tuple(s[len(INFER) + 1 :] for s in self.scopes if s.startswith(INFER + ":"))
        self._infer: dict[str, bool] = {}

    def allows(self, kind: str, model: str = "") -> bool:
        """True when this caller may make a request of ``kind`` (on ``model``)."""
        if kind == INFER:
            allowed = self._infer.get(model)
            if allowed is None:
                allowed = any(fnmatchcase(model, g) for g in self._globs)
                if len(self._infer) < _CACHE_LIMIT:
                    self._infer[model] = allowed
            return allowed
        if kind == READ:
            return self.read
        if kind == ADMIN:
            return self.admin
        return kind == OPEN

    def __repr__(self) -> str:
        return f"Principal({self.name!r}, {list(self.scopes)!r})"
