"""The auth middleware: credentials -> a principal -> the scope this request needs."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.auth.access import API_KEY, AUTHORIZATION, AccessControl, credential
from serving.auth.scopes import OPEN, required_scope
from serving.errors import FermionError
from serving.http.responses import send_error

__all__ = ["AuthMiddleware", "authorize"]

_AUTHORIZATION = AUTHORIZATION.encode()
_API_KEY = API_KEY.encode()


def _credential(headers: list[tuple[bytes, bytes]]) -> str | None:
    authorization = api_key = None
    for key, value in headers:
        if key == _AUTHORIZATION:
            authorization = value.decode("latin-1")
        elif key == _API_KEY:
            api_key = value.decode("latin-1")
    return credential(authorization, api_key)


def authorize(access: AccessControl, scope: Scope, needs: tuple[str, str] | None = None) -> None:
    """Admit the request of ``scope`` or raise its 401/403 (a FermionError).

    The principal is left in ``scope["state"]["principal"]`` for logs and rate limits;
    health probes need no credential. ``needs``: the ``(kind, model)`` the request
    needs where the caller knows it (``required_scope`` of its path otherwise).
    """
    kind, model = needs or required_scope(scope["method"], scope["path"])
    if kind != OPEN:
        principal = access.check(_credential(scope["headers"]), kind, model)
        scope.setdefault("state", {})["principal"] = principal


class AuthMiddleware:
    """Refuse requests without valid credentials (401) or without the scope they need (403).

    ``access`` decides (``authorize``), as it does for gRPC. ``public_paths`` (e.g.
    ``/metrics``) pass untouched.
    """

    def __init__(
        self, app: ASGIApp, *, access: AccessControl, public_paths: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self._access = access
        self._public = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._public:
            await self.app(scope, receive, send)
            return
        try:
            authorize(self._access, scope)
        except FermionError as e:
            await send_error(send, e)
            return
        await self.app(scope, receive, send)
