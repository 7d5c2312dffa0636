"""The route table: which routes exist, changes to them by hand, and their figures.

It is the inference service's ``RoutePolicy``: requests read a route whole (a
change replaces it at once), and a routed answer is mirrored to the shadow.
Route changes by hand (the admin API) are checked against the served versions,
written back to the config file, and refused while a rollout drives the route.

With a shared control store the table there is the truth: a change is written to
the store (which refuses it while a rollout holds the route) and every gateway
applies the store's versioned table whole, at once, when it sees a new version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping

import numpy as np
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from pydantic import ValidationError

from serving.config import ConfigError, RouteConfig
from serving.control.store import ControlStore, RouteSnapshot
from serving.errors import FermionError, InvalidInput
from serving.inference.repository import ModelRepository, ServedVersion
from serving.traffic.route_file import RouteFile
from serving.traffic.shadow import ShadowMirror
from serving.traffic.split import ModelRoute
from serving.traffic.windows import VersionWindow

__all__ = ["RolloutConflict", "RouteTable"]

log = logging.getLogger("fermion.routes")


class RolloutConflict(FermionError):
    """The route is being rolled out, or no rollout runs where one was expected (409)."""

    status_code = 409


class RouteTable:
    """Every model's route, the windows of figures per version, and the shadow mirror."""

    def __init__(
        self,
        routes: Mapping[str, RouteConfig],
        repository: ModelRepository,
        *,
        route_file: RouteFile | None = None,
        shadow: ShadowMirror | None = None,
        store: ControlStore | None = None,
    ) -> None:
        self._routes: dict[str, ModelRoute] = {
            name: ModelRoute(name, rc) for name, rc in routes.items()
        }
        #: Every model that had a route, for the route family (counters never go back).
        self._ever_routed = set(self._routes)
        self._repository = repository
        self._file = route_file if route_file is not None else RouteFile(None)
        self._windows: dict[tuple[str, int], VersionWindow] = {}
        self._locked: dict[str, str] = {}
        self.shadow = shadow if shadow is not None else ShadowMirror(repository)
        self._store = store
        self._pull_lock = asyncio.Lock()
        #: The version of the store's table applied here (0: none yet, or no store).
        self.applied_version = 0

    # ----------------------------------------------------------------- reading

    def get(self, name: str) -> ModelRoute | None:
        """The route of ``name`` (None: requests go to the latest version)."""
        return self._routes.get(name)

    def routes(self) -> dict[str, ModelRoute]:
        """Every route by name."""
        return dict(self._routes)

    def answered(
        self,
        name: str,
        route: ModelRoute,
        served: ServedVersion,
        inputs: dict[str, np.ndarray],
        rows: int,
        outputs: dict[str, np.ndarray],
    ) -> None:
        """Mirror a routed request that ``served`` answered to the route's shadow, if any."""
        shadow = route.shadow
        if shadow is not None and shadow.version != served.version:
            self.shadow.mirror(name, shadow, served, inputs, rows, outputs)

    def window(self, name: str, version: int) -> VersionWindow:
        """The figures of one version of ``name`` since the last read of this window."""
        key = (name, version)
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = VersionWindow(self._repository.counters.version(*key))
        return w

    # ----------------------------------------------------------------- changing

    def set(self, name: str, config: RouteConfig) -> ModelRoute:
        """Replace (or add) a route at once: each request sees the old or the new one whole."""
        route = ModelRoute(name, config)
        self._routes[name] = route
        self._ever_routed.add(name)
        return route

    def remove(self, name: str) -> ModelRoute | None:
        """Drop a route: its model's requests go to the latest version again."""
        return self._routes.pop(name, None)

    def check_versions(self, name: str, route: RouteConfig) -> None:
        """Raise unless every version the route sends traffic to is served and ready."""
        for version in sorted(route.versions_in_use()):
            try:
                self._repository.resolve(name, str(version))
            except FermionError as e:
                raise InvalidInput(f"route {name}: {e.message}") from None

    async def save(
        self, name: str, config: RouteConfig | None, *, fence: str | None = None
    ) -> None:
        """Apply (None: remove) a route and write it to the config file, unchecked.

        With a store: written there (as the rollout driver holding ``fence``, if given),
        then the store's table is applied here at once.
        """
        if self._store is not None:
            text = config.model_dump_json() if config is not None else None
            await self._store.set_route(name, text, fence=fence)
            await self.pull()
            return
        if config is not None:
            self.set(name, config)
        else:
            self.remove(name)
        await self._file.save(name, config)

    async def set_route(self, name: str, config: RouteConfig | None) -> None:
        """Replace (None: remove) a route by hand, checked and persisted; 409 while locked."""
        reason = self._locked.get(name)
        if reason is not None:
            raise RolloutConflict(reason)
        if config is not None:
            self.check_versions(name, config)
        elif name not in self._routes:
            raise InvalidInput(f"no route {name!r}")
        await self.save(name, config)

    # ----------------------------------------------------------------- the store

    def snapshot(self) -> RouteSnapshot:
        """The table applied here, as the store keeps it (to seed an empty store)."""
        routes = {name: r.config.model_dump_json() for name, r in self._routes.items()}
        return RouteSnapshot(max(1, self.applied_version), routes)

    def apply(self, snapshot: RouteSnapshot) -> None:
        """Replace every route at once by the store's table (a route that does not parse
        keeps its last applied form, and is logged)."""
        routes: dict[str, ModelRoute] = {}
        for name, text in snapshot.routes.items():
            try:
                routes[name] = ModelRoute(name, RouteConfig.model_validate_json(text))
            except (ValidationError, ValueError) as e:
                log.error("route %s in the control store is not valid, kept as it was: %s", name, e)
                if name in self._routes:
                    routes[name] = self._routes[name]
        self._routes = routes
        self._ever_routed.update(routes)
        self.applied_version = snapshot.version

    async def pull(self) -> bool:
        """Apply the store's table if it changed; True if it did. False with no table."""
        if self._store is None:
            return False
        async with self._pull_lock:
            snapshot = await self._store.routes()
            if snapshot is None or snapshot.version == self.applied_version:
                return False
            self.apply(snapshot)
        try:
            await self._file.save_all({n: r.config for n, r in self._routes.items()})
        except (ConfigError, OSError) as e:
            log.warning("route table version %d applied, not written back: %s", snapshot.version, e)
        log.info("applied route table version %d", snapshot.version)
        return True

    def lock(self, name: str, reason: str) -> None:
        """Refuse changes by hand to ``name`` (409 with ``reason``) until ``unlock``."""
        self._locked[name] = reason

    def unlock(self, name: str) -> None:
        """Accept changes by hand to ``name`` again."""
        self._locked.pop(name, None)

    # ----------------------------------------------------------------- metrics

    def collect(self) -> Iterator[Metric]:
        """``fermion_route_requests``: routed models' requests by version and outcome."""
        family = CounterMetricFamily(
            "fermion_route_requests",
            "Requests of routed models by the version that answered them, and outcome.",
            labels=["model", "version", "outcome"],
        )
        for c in self._repository.counters.all():
            if c.model not in self._ever_routed:
                continue
            errors = c.server_errors
            if c.ok:
                family.add_metric([c.model, str(c.version), "ok"], c.ok)
            if errors:
                family.add_metric([c.model, str(c.version), "error"], errors)
        yield family
