"""The inference hot path as pure ASGI: ``POST /v2/models/{m}[/versions/{v}]/infer``.

It sits innermost in the middleware stack, so request ids, tracing, auth, rate
limits and the body limit still apply, but it skips Starlette's router,
exception middleware and response objects, which cost more per request than the
rest of the gateway together. Every other path goes on to the Starlette app.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.errors import FermionError
from serving.http.responses import send_error
from serving.http.v2 import infer_body

__all__ = ["InferenceFastPath"]

log = logging.getLogger("fermion.gateway")


class InferenceFastPath:
    """Serve V2 inference requests directly; pass everything else to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or not path.endswith("/infer"):
            await self.app(scope, receive, send)
            return
        parts = path.split("/")
        n = len(parts)
        if n == 5 and parts[1] == "v2" and parts[2] == "models" and parts[3]:
            scope["path_params"] = {"model": parts[3]}
        elif (
            (n == 7 and parts[1] == "v2" and parts[2] == "models" and parts[4] == "versions")
            and parts[3]
            and parts[5]
        ):
            scope["path_params"] = {"model": parts[3], "version": parts[5]}
        else:
            await self.app(scope, receive, send)
            return
        try:
            content, headers = await infer_body(Request(scope, receive))
        except FermionError as e:
            await send_error(send, e)
            return
        except Exception:
            log.exception("unhandled error on %s", path)
            await send_error(send, FermionError("internal server error"))
            return
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        raw.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        await send({"type": "http.response.body", "body": content})
