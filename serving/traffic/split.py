"""A/B splits: a public model name -> weighted versions and sticky keys.

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
from collections.abc import Callable, Mapping
from itertools import accumulate

from serving.config import RouteConfig, ShadowConfig

__all__ = ["ModelRoute", "TrafficSplit"]

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
