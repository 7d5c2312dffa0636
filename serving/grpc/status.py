"""The gRPC status of each Fermion error: one table, as the HTTP status is one attribute.

| error             | HTTP | gRPC               |
|-------------------|------|--------------------|
| InvalidInput      | 400  | INVALID_ARGUMENT   |
| Unauthorized      | 401  | UNAUTHENTICATED    |
| Forbidden         | 403  | PERMISSION_DENIED  |
| ModelNotFound     | 404  | NOT_FOUND          |
| PayloadTooLarge   | 413  | RESOURCE_EXHAUSTED |
| RateLimited       | 429  | RESOURCE_EXHAUSTED |
| InferenceFailed   | 500  | INTERNAL           |
| ModelNotReady     | 503  | UNAVAILABLE        |
| Overloaded        | 503  | UNAVAILABLE        |
| DeadlineExceeded  | 504  | DEADLINE_EXCEEDED  |

A message over ``server.max_body_bytes`` is refused by gRPC itself, before Fermion sees
it, with RESOURCE_EXHAUSTED, as a body over the limit is 413 over HTTP.
"""

from __future__ import annotations

from typing import Final

import grpc

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

__all__ = ["STATUS", "status_of", "trailers_of"]

#: The gRPC status of each error type; a subclass takes its nearest listed base's.
STATUS: Final[dict[type[FermionError], grpc.StatusCode]] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    InferenceFailed: grpc.StatusCode.INTERNAL,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    FermionError: grpc.StatusCode.INTERNAL,
}


def status_of(error: FermionError) -> grpc.StatusCode:
    """The gRPC status code for ``error``."""
    for cls in type(error).__mro__:
        code = STATUS.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL  # pragma: no cover - FermionError is in the table


def trailers_of(error: FermionError) -> tuple[tuple[str, str], ...]:
    """The error's HTTP headers as trailing metadata (``retry-after``, ``www-authenticate``)."""
    return tuple((k.lower(), v) for k, v in error.headers().items())
