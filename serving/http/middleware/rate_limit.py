"""Rate limits: 429 with Retry-After for an inference request over its caller's limit."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.auth.scopes import infer_model
from serving.errors import RateLimited
from serving.http.responses import RejectHook, send_error
from serving.inference.limits import RateLimiter

__all__ = ["RateLimitMiddleware"]


def _caller(scope: Scope) -> str:
    principal = scope.get("state", {}).get("principal")
    if principal is not None:
        name: str = principal.name
        return name
    client = scope.get("client")
    return f"ip:{client[0]}" if client else "ip:?"


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
            wait = await self._limiter.admit(_caller(scope), model)
            if wait > 0.0:
                if self._on_reject is not None:
                    self._on_reject(model, "rate_limited")
                await send_error(
                    send, RateLimited(f"rate limit exceeded for {model}", retry_after_s=wait)
                )
                return
        await self.app(scope, receive, send)
