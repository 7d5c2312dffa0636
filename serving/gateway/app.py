"""Build the gateway's ASGI app from the configuration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from model_store.store import ModelStore
from serving.backends import Backend, create_backend
from serving.codec import encode_error
from serving.config import FermionConfig
from serving.errors import FermionError
from serving.gateway.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from serving.gateway.routes import routes
from serving.repository import ModelRepository

__all__ = ["create_app"]

log = logging.getLogger("fermion.gateway")


def _error(message: str, status_code: int, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        encode_error(message),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


async def _fermion_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FermionError)
    return _error(exc.message, exc.status_code, exc.headers())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail if exc.status_code != 404 else f"no route for {request.url.path}"
    return _error(str(message), exc.status_code, exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return _error("internal server error", 500)


def create_app(
    config: FermionConfig,
    *,
    store: ModelStore | None = None,
    backend: Backend | None = None,
    on_ready: Callable[[ModelRepository], None] | None = None,
) -> Starlette:
    """The gateway app: loads models in the background at start, drains them at shutdown.

    ``on_ready`` is called once every configured model has been loaded (or failed).
    """
    store = store or ModelStore(config.store.root)
    backend = backend or create_backend(config, store)
    repository = ModelRepository(config, store, backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await backend.start()

        async def load_all() -> None:
            await repository.start()
            if on_ready is not None:
                on_ready(repository)

        loading = asyncio.create_task(load_all())
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await repository.stop()
            await backend.stop()

    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(BodySizeLimitMiddleware, max_bytes=config.server.max_body_bytes),
        ],
        exception_handlers={
            FermionError: _fermion_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.repository = repository
    return app
