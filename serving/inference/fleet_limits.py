"""Fleet-wide rate limits: one token bucket per caller per rule for every gateway.

The bucket lives in the control store (a script on the store's clock). A gateway
does not ask it per request: it leases tokens in batches (about a tenth of a second
of the rule's rate), spends them locally, and fetches the next batch in the
background when half are gone. A bucket found empty is remembered until its next
token is due, so refused requests cost no round trip either. Leased tokens unspent
after ``hold_s`` go back to the bucket, so the fleet admits what one bucket would.
While the store is down, each gateway keeps local buckets at rate / live gateways.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence

from serving.config import RateLimitRule
from serving.control.store import ControlStore, StoreUnavailable
from serving.inference.limits import RateLimiter

__all__ = ["FleetRateLimiter", "rule_id"]

log = logging.getLogger("fermion.limits")

#: A lease holds about this much of a rule's rate (at least 1 token, at most the burst).
_LEASE_S = 0.1
#: Leased tokens unspent this long go back to the fleet's bucket.
_HOLD_S = 0.5


def rule_id(rule: RateLimitRule) -> str:
    """A short name of a rule, the same on every gateway with the same rule."""
    text = f"{rule.keys}|{rule.models}|{rule.rate!r}|{rule.burst}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class _Lease:
    """Tokens this gateway leased from one fleet bucket (one rule, one caller)."""

    __slots__ = (
        "batch",
        "bucket",
        "burst",
        "empty_until",
        "leased_at",
        "pending",
        "rate",
        "tokens",
    )

    def __init__(self, bucket: str, rule: RateLimitRule) -> None:
        self.bucket = bucket
        self.rate = rule.rate
        self.burst = rule.burst
        self.batch = max(1, min(rule.burst, math.ceil(rule.rate * _LEASE_S)))
        self.tokens = 0
        self.leased_at = 0.0
        #: The fleet bucket had no token for us before this (``time.monotonic``).
        self.empty_until = 0.0
        self.pending: asyncio.Task[None] | None = None

    async def _take(self, store: ControlStore) -> None:
        try:
            taken, wait = await store.take_tokens(self.bucket, self.rate, self.burst, self.batch)
        except StoreUnavailable:
            return  # the store is marked down: callers fall back to local buckets
        finally:
            self.pending = None
        now = time.monotonic()
        if taken:
            self.tokens += taken
            self.leased_at = now
        if self.tokens < 1:
            self.empty_until = now + wait

    def refill(self, store: ControlStore) -> asyncio.Task[None]:
        """The fetch of the next batch (one at a time, shared by every waiting request)."""
        if self.pending is None:
            self.pending = asyncio.get_running_loop().create_task(self._take(store))
        return self.pending

    def idle(self, now: float) -> bool:
        """True when the lease holds nothing worth keeping."""
        return self.tokens == 0 and self.pending is None and self.empty_until <= now


class FleetRateLimiter(RateLimiter):
    """``RateLimiter`` whose buckets are shared by the fleet through the control store."""

    def __init__(
        self,
        rules: Sequence[RateLimitRule],
        store: ControlStore,
        *,
        serves: Callable[[str], bool] | None = None,
        live: Callable[[], int] = lambda: 1,
    ) -> None:
        super().__init__(rules, serves=serves)
        self._store = store
        self._live = live
        self._ids = [rule_id(r) for r in rules]
        self._leases: dict[tuple[int, str], _Lease] = {}
        self._lease_plans: dict[tuple[str, str], tuple[_Lease, ...]] = {}
        #: Local buckets at rate / live gateways, while the store is down.
        self._fallback: RateLimiter | None = None

    def _fallback_acquire(self, caller: str, model: str) -> float:
        if self._fallback is None:
            live = max(1, self._live())
            scaled = [
                r.model_copy(update={"rate": r.rate / live, "burst": max(1, r.burst // live)})
                for r in self.rules
            ]
            log.warning("control store down: rate limits fall back to local buckets / %d", live)
            self._fallback = RateLimiter(scaled, serves=self._serves)
        return self._fallback.acquire(caller, model)

    def _plan_of(self, caller: str, model: str) -> tuple[_Lease, ...]:
        plan = self._lease_plans.get((caller, model))
        if plan is not None:
            return plan
        if self._serves is not None and not self._serves(model):
            return ()
        if len(self._lease_plans) >= 10_000:
            self._lease_plans.clear()
        leases = []
        for i in self.matching(caller, model):
            lease = self._leases.get((i, caller))
            if lease is None:
                lease = self._leases[(i, caller)] = _Lease(
                    f"{self._ids[i]}:{caller}", self.rules[i]
                )
            leases.append(lease)
        plan = self._lease_plans[(caller, model)] = tuple(leases)
        return plan

    async def admit(self, caller: str, model: str) -> float:
        """Spend a leased token of every matching rule: 0.0, or the seconds to wait."""
        if not self._store.up:
            return self._fallback_acquire(caller, model)
        self._fallback = None
        plan = self._plan_of(caller, model)
        for _ in range(3):
            now = time.monotonic()
            wait, missing = 0.0, []
            for lease in plan:
                if lease.tokens >= 1:
                    continue
                if lease.empty_until > now:
                    wait = max(wait, lease.empty_until - now)
                else:
                    missing.append(lease)
            if wait > 0.0:
                return wait
            if not missing:
                break
            await asyncio.gather(*(lease.refill(self._store) for lease in missing))
            if not self._store.up:
                return self._fallback_acquire(caller, model)
        else:  # other requests took the tokens fetched for this one three times over
            return max(1.0 / p.rate for p in plan)
        for lease in plan:
            lease.tokens -= 1
            if lease.tokens * 2 < lease.batch and lease.pending is None:
                lease.refill(self._store)
        return 0.0

    async def give_back(self, *, everything: bool = False) -> None:
        """Return tokens leased more than ``_HOLD_S`` ago (all with ``everything``); drop idle
        leases. Called by the gateway's sync loop."""
        now = time.monotonic()
        idle = []
        for key, lease in list(self._leases.items()):
            if (
                lease.tokens
                and lease.pending is None
                and (everything or now - lease.leased_at > _HOLD_S)
            ):
                count, lease.tokens = lease.tokens, 0
                try:
                    await self._store.give_tokens(lease.bucket, lease.rate, lease.burst, count)
                except StoreUnavailable:
                    return  # the tokens are lost to the fleet: it admits less, never more
            if lease.idle(now):
                idle.append(key)
        if idle:
            for key in idle:
                del self._leases[key]
            self._lease_plans.clear()

    @property
    def leased(self) -> int:
        """Tokens leased and not spent, over every bucket."""
        return sum(lease.tokens for lease in self._leases.values())
