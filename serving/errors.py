"""Typed errors with an HTTP status; the gateway turns them into V2 error bodies."""

from __future__ import annotations

import math

__all__ = [
    "DeadlineExceeded",
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
    "retry_after",
]


def retry_after(seconds: float) -> str:
    """The ``Retry-After`` value for a wait of ``seconds``: whole seconds rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


class FermionError(Exception):
    """Base of every error a client can see: a message and an HTTP status."""

    status_code: int = 500
    #: Why a request was refused before it was computed (a metrics label); None: not a refusal.
    reason: str | None = None

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code

    def headers(self) -> dict[str, str]:
        """Extra response headers for this error."""
        return {}


class InvalidInput(FermionError):
    """The request is malformed or does not match the model's signature (400)."""

    status_code = 400
    reason = "invalid"


class Unauthorized(FermionError):
    """No credentials, or credentials that are not valid (401)."""

    status_code = 401
    reason = "unauthenticated"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(FermionError):
    """Valid credentials without the scope this request needs (403)."""

    status_code = 403
    reason = "forbidden"


class RateLimited(FermionError):
    """Over the caller's rate limit (429 with Retry-After)."""

    status_code = 429
    reason = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": retry_after(self.retry_after_s)}


class ModelNotFound(FermionError):
    """Unknown model or version (404)."""

    status_code = 404
    reason = "unknown_model"


class PayloadTooLarge(FermionError):
    """The request body is over the configured limit (413)."""

    status_code = 413
    reason = "too_large"


class InferenceFailed(FermionError):
    """The model failed while computing this request's batch (500)."""

    status_code = 500


class ModelNotReady(FermionError):
    """The model version exists but is not ready to serve (503)."""

    status_code = 503
    reason = "not_ready"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": retry_after(1.0)}


class Overloaded(FermionError):
    """The queue is full; the client should retry later (503 with Retry-After)."""

    status_code = 503
    reason = "queue_full"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": retry_after(self.retry_after_s)}


class DeadlineExceeded(FermionError):
    """The request's deadline passed before it was computed (504)."""

    status_code = 504
    reason = "deadline"
