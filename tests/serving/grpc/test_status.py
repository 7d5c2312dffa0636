"""Every Fermion error reaches a gRPC client with the status its README row promises."""

from __future__ import annotations

import grpc
import pytest

from serving import errors
from serving.grpc.status import STATUS, status_of, trailers_of

C = grpc.StatusCode


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidInput("x"), C.INVALID_ARGUMENT),
        (errors.ModelNotFound("x"), C.NOT_FOUND),
        (errors.ModelNotReady("x"), C.UNAVAILABLE),
        (errors.Overloaded("x"), C.UNAVAILABLE),
        (errors.Unauthorized("x"), C.UNAUTHENTICATED),
        (errors.Forbidden("x"), C.PERMISSION_DENIED),
        (errors.RateLimited("x"), C.RESOURCE_EXHAUSTED),
        (errors.PayloadTooLarge("x"), C.RESOURCE_EXHAUSTED),
        (errors.DeadlineExceeded("x"), C.DEADLINE_EXCEEDED),
        (errors.InferenceFailed("x"), C.INTERNAL),
        (errors.FermionError("x"), C.INTERNAL),
    ],
)
def test_each_error_has_its_status(error: errors.FermionError, code: grpc.StatusCode) -> None:
    assert status_of(error) is code


def test_every_public_error_type_is_in_the_table() -> None:
    public = {getattr(errors, n) for n in errors.__all__ if isinstance(getattr(errors, n), type)}
    assert public == set(STATUS)


def test_a_subclass_takes_its_base_s_status() -> None:
    class Shed(errors.Overloaded):
        pass

    assert status_of(Shed("x")) is C.UNAVAILABLE


def test_retry_after_travels_as_trailing_metadata() -> None:
    assert trailers_of(errors.RateLimited("x", retry_after_s=2.5)) == (("retry-after", "3"),)
    assert trailers_of(errors.Unauthorized("x")) == (("www-authenticate", "Bearer"),)
    assert trailers_of(errors.InvalidInput("x")) == ()
