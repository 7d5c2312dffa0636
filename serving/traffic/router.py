"""A/B routing: a public model name -> weighted versions, sticky keys, and the route table.

A request without a sticky key draws a version at random in proportion to the
weights. A request with a key gets the version of highest weighted rendezvous
score ``w_v / -ln(u(key, v))`` (``u`` a uniform hash of key and version): every
key keeps its version for a given split, and raising one version's weight only
moves keys *to* that version (scaling every weight moves none).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import time
from collections.abc import Callable, Mapping
from itertools import accumulate

import numpy as np

from serving.config import RouteConfig, ShadowConfig
from serving.errors import FermionError
from serving.inference.batcher import DynamicBatcher
from serving.inference.repository import ServedVersion
from serving.observability.traffic_metrics import ROUTE_REQUESTS
from serving.traffic.shadow import ShadowMirror
from serving.traffic.windows import VersionWindow

__all__ = ["VERSION_HEADER", "ModelRoute", "Router", "TrafficSplit"]

#: The response header naming the version that answered.
VERSION_HEADER = "fermion-model-version"

_TWO_64 = float(2**64)


class TrafficSplit:
    """Immutable version weights, picked at random or by a sticky key."""

    __slots__ = ("_cumulative", "_hashers", "_random", "_total", "versions", "weights")

    def __init__(
        self, weights: Mapping[int, float], rand: Callable[[], float] = random.random
    ) -> None:
        live = {int(v): float(w) for v, w in sorted(weights.items()) if w > 0}
        if not live:
            raise ValueError("a split needs at least one version with a positive weight")
        #: Every version given, weight 0 included.
        self.weights: dict[int, float] = {int(v): float(w) for v, w in sorted(weights.items())}
        self.versions: tuple[str, ...] = tuple(str(v) for v in live)
        # One hash state per version, salted with it; a key's hash continues a copy.
        self._hashers = tuple(
            (hashlib.blake2b(f"fermion-v{v}:".encode(), digest_size=8), live[int(v)])
            for v in self.versions
        )
        self._cumulative = list(accumulate(live.values()))
        self._total = self._cumulative[-1]
        self._random = rand

    def shares(self) -> dict[int, float]:
        """Each version's expected share of requests (0 to 1)."""
        return {v: w / self._total for v, w in self.weights.items()}

    def pick(self) -> str:
        """A version drawn in proportion to the weights."""
        if len(self.versions) == 1:
            return self.versions[0]
        i = bisect.bisect_right(self._cumulative, self._random() * self._total)
        return self.versions[min(i, len(self.versions) - 1)]

    def pick_sticky(self, key: str) -> str:
        """The version of ``key``: always the same one for the same weights."""
        if len(self.versions) == 1:
            return self.versions[0]
        raw = key.encode()
        best, best_score = self.versions[0], -1.0
        for version, (salted, weight) in zip(self.versions, self._hashers, strict=True):
            hasher = salted.copy()
            hasher.update(raw)
            h = int.from_bytes(hasher.digest(), "little")
            score = weight / -math.log((h + 0.5) / _TWO_64)
            if score > best_score:
                best, best_score = version, score
        return best


class ModelRoute:
    """One compiled route; replaced whole (never changed) when its configuration changes."""

    __slots__ = ("config", "header", "name", "parameter", "shadow", "split")

    def __init__(self, name: str, config: RouteConfig) -> None:
        self.name = name
        self.config = config
        self.split = TrafficSplit(config.split)
        self.header = config.sticky.header if config.sticky else None
        self.parameter = config.sticky.parameter if config.sticky else None
        self.shadow: ShadowConfig | None = config.shadow

    def pick(self, headers: Mapping[str, str]) -> str:
        """The version for a request with these headers (a random one without a key)."""
        if self.header is not None:
            key = headers.get(self.header)
            if key is not None:
                return self.split.pick_sticky(key)
        return self.split.pick()

    def pick_by_parameter(self, parameters: Mapping[str, object]) -> str | None:
        """The sticky version for these request parameters (None: no key, keep the draw)."""
        if self.parameter is None:
            return None
        key = parameters.get(self.parameter)
        return None if key is None else self.split.pick_sticky(str(key))


class Router:
    """The route table, the figures of routed traffic, and its shadow copies."""

    def __init__(self, routes: Mapping[str, RouteConfig], shadow: ShadowMirror) -> None:
        self._routes: dict[str, ModelRoute] = {
            name: ModelRoute(name, rc) for name, rc in routes.items()
        }
        self._windows: dict[tuple[str, int], VersionWindow] = {}
        self.shadow = shadow

    def get(self, name: str) -> ModelRoute | None:
        """The route of ``name`` (None: requests go to the latest version)."""
        return self._routes.get(name)

    def routes(self) -> dict[str, ModelRoute]:
        """Every route by name."""
        return dict(self._routes)

    def set(self, name: str, config: RouteConfig) -> ModelRoute:
        """Replace (or add) a route at once: each request sees the old or the new one whole."""
        route = ModelRoute(name, config)
        self._routes[name] = route
        return route

    def remove(self, name: str) -> ModelRoute | None:
        """Drop a route: its model's requests go to the latest version again."""
        return self._routes.pop(name, None)

    def window(self, name: str, version: int) -> VersionWindow:
        """The figures window of one version of a routed model."""
        key = (name, version)
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = VersionWindow()
        return w

    async def submit(
        self,
        route: ModelRoute,
        sv: ServedVersion,
        batcher: DynamicBatcher,
        inputs: dict[str, np.ndarray],
        rows: int,
        *,
        deadline_ns: int | None = None,
        priority: int = 0,
    ) -> dict[str, np.ndarray]:
        """Run a routed request on ``sv``, record its figures and mirror it to the shadow.

        ``deadline_ns`` and ``priority`` go to the batcher as for any request.
        """
        window = self.window(route.name, sv.version)
        started = time.perf_counter()
        try:
            outputs = await batcher.submit(inputs, rows, deadline_ns=deadline_ns, priority=priority)
        except FermionError as e:
            if e.status_code >= 500:
                window.record_error()
                ROUTE_REQUESTS.labels(route.name, str(sv.version), "error").inc()
            raise
        window.record(time.perf_counter() - started)
        ROUTE_REQUESTS.labels(route.name, str(sv.version), "ok").inc()
        if route.shadow is not None and route.shadow.version != sv.version:
            self.shadow.mirror(route.name, route.shadow, sv, inputs, rows, outputs)
        return outputs
