"""Fermion's serving side: the public surface.

    from serving import create_app, load_config

    app = create_app(load_config("fermion.yaml"))

Everything named here is public; the layers underneath (``http``, ``grpc``,
``inference``, ``traffic``, ``observability``, ``auth``, ``cli``) are internal and
may change. ``create_app`` is imported on first use, so importing the configuration
or the error types loads no web framework (a Ray replica process never does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serving.config import ConfigError, FermionConfig, load_config
from serving.errors import (
    DeadlineExceeded,
    FermionError,
    Forbidden,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
)

if TYPE_CHECKING:
    from serving.http.app import create_app

__all__ = [
    "ConfigError",
    "DeadlineExceeded",
    "FermionConfig",
    "FermionError",
    "Forbidden",
    "InferenceFailed",
    "InvalidInput",
    "ModelNotFound",
    "ModelNotReady",
    "Overloaded",
    "PayloadTooLarge",
    "RateLimited",
    "Unauthorized",
    "create_app",
    "load_config",
]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from serving.http.app import create_app

        return create_app
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
