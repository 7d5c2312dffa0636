"""The control store interface, and the table from a URL scheme to its implementation.

The hot path never waits on the store where a local copy will do: gateways apply
route snapshots they read in the background, spend rate-limit tokens they leased in
batches, and publish canary figures once per sync tick. A store call that fails marks
the store down (``up`` False) and raises ``StoreUnavailable``; callers fall back to
the last state they applied.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

from model_store.importer import import_from_string
from serving.config import ControlConfig
from serving.errors import FermionError

__all__ = [
    "STORES",
    "ControlStore",
    "GatewayInfo",
    "RouteSnapshot",
    "StoreConflict",
    "StoreUnavailable",
    "create_store",
    "redacted",
]

#: URL scheme -> "module:Class" of the store, imported only when chosen.
STORES: dict[str, str] = {
    "redis": "serving.control.redis_store:RedisControlStore",
    "rediss": "serving.control.redis_store:RedisControlStore",
}


class StoreUnavailable(FermionError):
    """The control store cannot be reached (503): changes wait, inference goes on."""

    status_code = 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class StoreConflict(FermionError):
    """A change the store refused: a rollout holds the route, or one already runs (409)."""

    status_code = 409


@dataclass(frozen=True)
class RouteSnapshot:
    """The route table as the store holds it: a version and each route as JSON."""

    version: int
    routes: Mapping[str, str]


@dataclass(frozen=True)
class GatewayInfo:
    """One gateway of the fleet as its heartbeats describe it."""

    id: str
    #: What the gateway wrote about itself (address, started_at, backend, route_version...).
    info: Mapping[str, object]
    #: Seconds since its last heartbeat, by the store's clock.
    age_s: float


class ControlStore(ABC):
    """Fleet-wide control state. Every method raises StoreUnavailable when the store is down."""

    #: False once a call failed, True again after one succeeded.
    up: bool = False

    @abstractmethod
    async def start(self) -> None:
        """Connect (the store may be down: ``up`` says so, later calls retry)."""

    @abstractmethod
    async def close(self) -> None:
        """Release the connections."""

    # ----------------------------------------------------------------- routes

    @abstractmethod
    async def route_version(self) -> int | None:
        """The route table's version (None: the store holds no table, e.g. restarted empty)."""

    @abstractmethod
    async def routes(self) -> RouteSnapshot | None:
        """The whole route table, read atomically (None: the store holds none)."""

    @abstractmethod
    async def seed_routes(self, snapshot: RouteSnapshot) -> bool:
        """Write ``snapshot`` if the store holds no table; True if written."""

    @abstractmethod
    async def set_route(self, name: str, route_json: str | None, *, fence: str | None) -> int:
        """Replace (None: remove) one route; the table's new version.

        Without ``fence`` (a change by hand) a running rollout of ``name`` refuses it
        (StoreConflict); with one, only the holder of that rollout lease may write.
        """

    # ----------------------------------------------------------------- rollouts

    @abstractmethod
    async def rollouts(self) -> dict[str, str]:
        """Every rollout state by model, as JSON."""

    @abstractmethod
    async def create_rollout(self, name: str, state_json: str) -> None:
        """Record a new running rollout; StoreConflict if one of ``name`` is running."""

    @abstractmethod
    async def save_rollout(self, name: str, state_json: str, *, fence: str) -> bool:
        """Write a rollout's state as the holder of its lease; False when fenced out."""

    @abstractmethod
    async def seed_rollouts(self, states: Mapping[str, str]) -> None:
        """Write the rollout states the store lacks (after it lost its data)."""

    @abstractmethod
    async def acquire_lease(
        self, name: str, holder: str, ttl_s: float, *, force: bool = False
    ) -> str | None:
        """Take the lease of ``name``'s rollout if free (or, ``force``, from its holder,
        whose later writes are then refused): its fencing value, else None."""

    @abstractmethod
    async def renew_lease(self, name: str, fence: str, ttl_s: float) -> bool:
        """Extend a held lease; False when it is no longer held under ``fence``."""

    @abstractmethod
    async def release_lease(self, name: str, fence: str) -> None:
        """Give up a held lease (another gateway may take it at once)."""

    # ----------------------------------------------------------------- figures

    @abstractmethod
    async def add_figures(self, figures: Mapping[str, Mapping[str, float]]) -> None:
        """Add counts to named figure sets (a field named ``max*`` keeps the largest)."""

    @abstractmethod
    async def take_figures(self, names: list[str]) -> dict[str, dict[str, float]]:
        """Read and reset figure sets: everything every gateway added since the last take."""

    # ----------------------------------------------------------------- rate limits

    @abstractmethod
    async def take_tokens(
        self, bucket: str, rate: float, burst: int, wanted: int
    ) -> tuple[int, float]:
        """Take up to ``wanted`` tokens from a fleet-wide bucket: (taken, seconds to the next)."""

    @abstractmethod
    async def give_tokens(self, bucket: str, rate: float, burst: int, count: int) -> None:
        """Return unspent tokens to a fleet-wide bucket."""

    # ----------------------------------------------------------------- gateways

    @abstractmethod
    async def heartbeat(self, gateway: str, info: Mapping[str, object], stale_s: float) -> int:
        """Record that ``gateway`` is alive; the number of gateways alive (``stale_s``)."""

    @abstractmethod
    async def gateways(self) -> list[GatewayInfo]:
        """Every gateway seen recently, by id."""

    @abstractmethod
    async def leave(self, gateway: str) -> None:
        """Remove ``gateway`` from the fleet (it is stopping)."""


def redacted(url: str) -> str:
    """``url`` without its password, for logs and listings."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user + ':***' if user else '***'}@{host}"


def create_store(config: ControlConfig) -> ControlStore | None:
    """The store named by ``config.store`` (None for ``memory``: nothing is shared)."""
    if not config.shared:
        return None
    scheme = config.store.partition("://")[0]
    spec = STORES.get(scheme)
    if spec is None:
        raise ValueError(f"unknown control store {scheme!r}; known: memory, {sorted(STORES)}")
    try:
        cls = import_from_string(spec)
    except ImportError as e:
        raise RuntimeError(
            f"control store {scheme!r} is not available ({e}); pip install 'redis>=5'"
        ) from e
    store: ControlStore = cls(config)
    return store
