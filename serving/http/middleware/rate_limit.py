"""Rate limits: 429 with Retry-After for an inference request over its caller's limit."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.auth.scopes import infer_model
from serving.errors import RateLimited
from serving.http.responses import RejectHook, send_error
from serving.inference.limits import RateLimiter, caller_key

__all__ = ["RateLimitMiddleware"]


def _caller(scope: Scope) -> str:
    principal = scope.get("state", {}).get("principal")
    client = scope.get("client")
    return caller_key(principal.name if principal is not None else None, client and client[0])


class RateLimitMiddleware:
    """429 with Retry-After for inference requests over their caller's rate limit."""

    def __init__(
        self, app: ASGIApp, *, limiter: RateLimiter, on_reject: RejectHook | None = None
    ) -> None:
        self.app = app
        self._limiter = limiter
        self._on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = infer_model(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if model is not None:
            try:
                await self._limiter.check(_caller(scope), model)
            except RateLimited as e:
                if self._on_reject is not None:
                    self._on_reject(model, "rate_limited")
                await send_error(send, e)
                return
        await self.app(scope, receive, send)
