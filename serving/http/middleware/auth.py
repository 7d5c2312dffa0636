"""The auth middleware: credentials -> a principal -> the scope this request needs."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.auth.keys import ApiKeys
from serving.auth.scopes import INFER, OPEN, Principal, required_scope
from serving.auth.tokens import JwtVerifier, looks_like_jwt
from serving.errors import Forbidden, Unauthorized
from serving.http.responses import RejectHook, send_error

__all__ = ["AuthMiddleware"]

_AUTHORIZATION = b"authorization"
_API_KEY = b"x-api-key"


def _credential(headers: list[tuple[bytes, bytes]]) -> str | None:
    for key, value in headers:
        if key == _AUTHORIZATION:
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip().decode("latin-1")
        elif key == _API_KEY and value.strip():
            return value.strip().decode("latin-1")
    return None


class AuthMiddleware:
    """Refuse requests without valid credentials (401) or without the scope they need (403).

    Health probes pass untouched; so do ``public_paths`` (e.g. ``/metrics``). The
    principal is left in ``scope["state"]["principal"]`` for logs and rate limits.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: ApiKeys | None = None,
        jwt: JwtVerifier | None = None,
        public_paths: frozenset[str] = frozenset(),
        on_reject: RejectHook | None = None,
    ) -> None:
        self.app = app
        self._keys = keys
        self._jwt = jwt
        self._public = public_paths
        self._on_reject = on_reject

    def _authenticate(self, token: str) -> Principal | None:
        if self._jwt is not None and looks_like_jwt(token):
            return self._jwt.authenticate(token)
        if self._keys is not None:
            return self._keys.authenticate(token)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._public:
            await self.app(scope, receive, send)
            return
        kind, model = required_scope(scope["method"], scope["path"])
        if kind == OPEN:
            await self.app(scope, receive, send)
            return
        token = _credential(scope["headers"])
        principal = self._authenticate(token) if token is not None else None
        if principal is None:
            if self._on_reject is not None:
                self._on_reject(model, "unauthenticated")
            await send_error(send, Unauthorized("missing or invalid credentials"))
            return
        if not principal.allows(kind, model):
            if self._on_reject is not None:
                self._on_reject(model, "forbidden")
            needed = f"{INFER}:{model}" if kind == INFER else kind
            await send_error(send, Forbidden(f"this credential lacks the scope {needed}"))
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)
