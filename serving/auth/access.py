"""The access decision every transport makes: credential -> principal -> scope -> allowed.

The HTTP auth middleware and the gRPC servicer both ask ``AccessControl.check``; each only
finds the credential in its own framing (``credential`` reads the two places a client may
put it) and names the scope the request needs (``required_scope`` for an HTTP path).
"""

from __future__ import annotations

from collections.abc import Callable

from serving.auth.keys import ApiKeys
from serving.auth.scopes import INFER, Principal
from serving.auth.tokens import JwtVerifier, looks_like_jwt
from serving.errors import Forbidden, Unauthorized

__all__ = ["API_KEY", "AUTHORIZATION", "AccessControl", "RejectHook", "credential"]

#: The header (or gRPC metadata key) carrying ``Bearer <token>``.
AUTHORIZATION = "authorization"
#: The header (or gRPC metadata key) carrying an API key.
API_KEY = "x-api-key"

#: Counts a refused request: ``(model, reason)``, model ``""`` when none is named.
RejectHook = Callable[[str, str], None]


def credential(authorization: str | None, api_key: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>``, else the ``x-api-key`` value."""
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if api_key is not None and api_key.strip():
        return api_key.strip()
    return None


class AccessControl:
    """Who a credential belongs to (API key or JWT) and whether it may make a request."""

    __slots__ = ("_jwt", "_keys", "_on_reject")

    def __init__(
        self,
        *,
        keys: ApiKeys | None = None,
        jwt: JwtVerifier | None = None,
        on_reject: RejectHook | None = None,
    ) -> None:
        self._keys = keys
        self._jwt = jwt
        self._on_reject = on_reject

    def authenticate(self, token: str) -> Principal | None:
        """The caller holding ``token``, or None for one that is unknown or not valid."""
        if self._jwt is not None and looks_like_jwt(token):
            return self._jwt.authenticate(token)
        if self._keys is not None:
            return self._keys.authenticate(token)
        return None

    def check(self, token: str | None, kind: str, model: str = "") -> Principal:
        """The caller, allowed a request of ``kind`` (on ``model``).

        Raises Unauthorized without a valid credential, Forbidden without the scope
        (each counted by the reject hook as ``unauthenticated`` or ``forbidden``).
        """
        principal = self.authenticate(token) if token is not None else None
        if principal is None:
            if self._on_reject is not None:
                self._on_reject(model, "unauthenticated")
            raise Unauthorized("missing or invalid credentials")
        if not principal.allows(kind, model):
            if self._on_reject is not None:
                self._on_reject(model, "forbidden")
            needed = f"{INFER}:{model}" if kind == INFER else kind
            raise Forbidden(f"this credential lacks the scope {needed}")
        return principal
