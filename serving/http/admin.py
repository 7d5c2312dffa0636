"""The admin API under ``/admin/``: read and replace routes, start, stop and watch rollouts,
list the gateways of the fleet.

With auth off, only loopback clients (127.0.0.1, ::1) may use it and others get
403; with auth on, it needs the ``admin`` scope (checked by the auth middleware).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.config import RouteConfig, validation_problems
from serving.control.store import redacted
from serving.errors import Forbidden, InvalidInput, ModelNotFound
from serving.http.responses import json_response as _json
from serving.http.responses import send_error
from serving.traffic.canary import RolloutController, RolloutSpec
from serving.traffic.fleet import FleetSync, Gateway
from serving.traffic.route_table import RouteTable

__all__ = ["LOOPBACK_HOSTS", "LoopbackOnlyMiddleware", "admin_mount"]

_M = TypeVar("_M", bound=BaseModel)

#: Client hosts the admin API answers.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


class LoopbackOnlyMiddleware:
    """Refuse (403) every request whose client is not on loopback; ``what`` names the API."""

    def __init__(self, app: ASGIApp, what: str = "the admin API") -> None:
        self.app = app
        self._refusal = f"{what} answers loopback clients only"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] == "http" and (client is None or client[0] not in LOOPBACK_HOSTS):
            await send_error(send, Forbidden(self._refusal))
            return
        await self.app(scope, receive, send)


def _router(request: Request) -> RouteTable:
    routes: RouteTable = request.app.state.routes
    return routes


def _controller(request: Request) -> RolloutController:
    controller: RolloutController = request.app.state.rollouts
    return controller


async def _body(request: Request, model: type[_M]) -> _M:
    raw = await request.body()
    try:
        return model.model_validate(orjson.loads(raw or b"{}"))
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"request body is not valid JSON: {e}") from None
    except ValidationError as e:
        problems = "; ".join(validation_problems(e, root="<body>"))
        raise InvalidInput(f"invalid {model.__name__}: {problems}") from None


def _route_view(request: Request, name: str) -> dict[str, Any]:
    router = _router(request)
    route = router.get(name)
    if route is None:
        raise ModelNotFound(f"no route {name!r}")
    shadows = router.shadow.windows(name)
    return {
        "model": name,
        **route.config.model_dump(mode="json"),
        "shares": {str(v): round(s, 6) for v, s in route.split.shares().items()},
        "shadow_figures": {
            f"{primary}->{shadow}": w.total.summary() for (primary, shadow), w in shadows.items()
        },
        "rollout_running": _controller(request).running(name),
    }


async def list_routes(request: Request) -> Response:
    names = sorted(_router(request).routes())
    return _json({"routes": [_route_view(request, n) for n in names]})


async def get_route(request: Request) -> Response:
    return _json(_route_view(request, request.path_params["model"]))


async def put_route(request: Request) -> Response:
    name = request.path_params["model"]
    config = await _body(request, RouteConfig)
    await _router(request).set_route(name, config)
    return _json(_route_view(request, name))


class _Split(BaseModel):
    split: dict[int, float]


async def put_split(request: Request) -> Response:
    name = request.path_params["model"]
    route = _router(request).get(name)
    body = await _body(request, _Split)
    base = route.config.model_dump() if route else {}
    try:
        config = RouteConfig.model_validate(base | {"split": body.split})
    except ValidationError as e:
        raise InvalidInput(f"invalid split: {e.errors()[0]['msg']}") from None
    await _router(request).set_route(name, config)
    return _json(_route_view(request, name))


async def delete_route(request: Request) -> Response:
    name = request.path_params["model"]
    await _router(request).set_route(name, None)
    return _json({})


async def list_rollouts(request: Request) -> Response:
    await _controller(request).refresh()
    states = _controller(request).states()
    return _json({"rollouts": [s.model_dump(mode="json") for s in states]})


async def get_rollout(request: Request) -> Response:
    await _controller(request).refresh()
    state = _controller(request).state(request.path_params["model"])
    return _json(state.model_dump(mode="json"))


async def start_rollout(request: Request) -> Response:
    spec = await _body(request, RolloutSpec)
    state = await _controller(request).begin(request.path_params["model"], spec)
    return _json(state.model_dump(mode="json"), 201)


async def stop_rollout(request: Request) -> Response:
    state = await _controller(request).abort(request.path_params["model"])
    return _json(state.model_dump(mode="json"))


async def fleet_status(request: Request) -> Response:
    """This gateway's fleet: every gateway with its heartbeat and applied route version."""
    gateway: Gateway = request.app.state.gateway
    fleet: FleetSync | None = request.app.state.fleet
    if fleet is None:
        me = {**asdict(gateway), "route_version": 0, "heartbeat_age_s": 0.0}
        me["driving"] = _controller(request).driving()
        return _json({"store": "memory", "store_up": True, "self": gateway.id, "gateways": [me]})
    rows = [
        {**g.info, "id": g.id, "heartbeat_age_s": round(g.age_s, 3)} for g in await fleet.gateways()
    ]
    return _json(
        {
            "store": redacted(request.app.state.config.control.store),
            "store_up": fleet.store.up,
            "self": gateway.id,
            "route_version": _router(request).applied_version,
            "gateways": rows,
        }
    )


_ADMIN_ROUTES = [
    Route("/fleet", fleet_status, methods=["GET"]),
    Route("/routes", list_routes, methods=["GET"]),
    Route("/routes/{model}", get_route, methods=["GET"]),
    Route("/routes/{model}", put_route, methods=["PUT"]),
    Route("/routes/{model}", delete_route, methods=["DELETE"]),
    Route("/routes/{model}/split", put_split, methods=["PUT"]),
    Route("/rollouts", list_rollouts, methods=["GET"]),
    Route("/rollouts/{model}", get_rollout, methods=["GET"]),
    Route("/rollouts/{model}", start_rollout, methods=["POST"]),
    Route("/rollouts/{model}/stop", stop_rollout, methods=["POST"]),
]


def admin_mount(*, loopback_only: bool) -> Mount:
    """The admin routes under ``/admin``; ``loopback_only`` refuses other clients (403)."""
    middleware = [Middleware(LoopbackOnlyMiddleware)] if loopback_only else []
    return Mount("/admin", routes=_ADMIN_ROUTES, middleware=middleware)
