"""Limits: token-bucket rate limits per caller and model glob, request size, deadlines.

``RateLimiter.check`` is called by every transport before the body is read (the HTTP
rate-limit middleware: 429 with Retry-After; gRPC: RESOURCE_EXHAUSTED), with the caller
named by ``caller_key``; ``RequestLimits`` is what the inference service checks once a
request is decoded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from serving.config import LimitsConfig, RateLimitRule
from serving.errors import InvalidInput, RateLimited

__all__ = [
    "TIMEOUT_HEADER",
    "RateLimiter",
    "RequestLimits",
    "TokenBucket",
    "caller_key",
]

#: Request header carrying a deadline in milliseconds.
TIMEOUT_HEADER = "fermion-timeout-ms"
#: Buckets (and cached plans) kept before idle ones are swept; the bound grows with live ones.
_SWEEP_AT = 10_000


def caller_key(principal: str | None, host: str | None) -> str:
    """Whose bucket a request takes from: its principal's name, else ``ip:<address>``."""
    if principal is not None:
        return principal
    return f"ip:{host}" if host else "ip:?"


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one token per request."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def refill(self, now: float) -> float:
        """Tokens available at ``now``."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens

    def wait_s(self) -> float:
        """Seconds until the next token (after ``refill``)."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


class RateLimiter:
    """Every rule matching (caller, model) must have a token for the request to pass.

    A rule's bucket is per caller and shared by all the models its glob matches. State
    stays bounded without ever resetting a live caller: a bucket that has refilled to
    full carries no state and is dropped when buckets pile up, and a model that is not
    served (``serves`` says False) creates none (its request is admitted here and
    answered 404 further on).
    """

    def __init__(
        self, rules: Sequence[RateLimitRule], *, serves: Callable[[str], bool] | None = None
    ) -> None:
        self._rules = list(rules)
        self._serves = serves
        self._buckets: dict[tuple[int, str], TokenBucket] = {}
        self._plan: dict[tuple[str, str], tuple[TokenBucket, ...]] = {}
        self._sweep_at = _SWEEP_AT

    @property
    def rules(self) -> list[RateLimitRule]:
        """The rules, in the order given."""
        return list(self._rules)

    def matching(self, caller: str, model: str) -> list[int]:
        """The indexes of the rules matching (caller, model)."""
        return [
            i
            for i, rule in enumerate(self._rules)
            if fnmatchcase(caller, rule.keys) and fnmatchcase(model, rule.models)
        ]

    def _plan_for(self, caller: str, model: str, now: float) -> tuple[TokenBucket, ...]:
        if self._serves is not None and not self._serves(model):
            return ()  # never cached: unknown names must not grow any state
        if len(self._buckets) >= self._sweep_at or len(self._plan) >= self._sweep_at:
            self._sweep(now)
        buckets = []
        for i in self.matching(caller, model):
            bucket = self._buckets.get((i, caller))
            if bucket is None:
                rule = self._rules[i]
                bucket = self._buckets[(i, caller)] = TokenBucket(rule.rate, rule.burst, now)
            buckets.append(bucket)
        plan = self._plan[(caller, model)] = tuple(buckets)
        return plan

    def _sweep(self, now: float) -> None:
        """Drop the buckets that refilled to full (and the cached plans, rebuilt on use)."""
        self._buckets = {k: b for k, b in self._buckets.items() if b.refill(now) < b.burst}
        self._plan.clear()
        self._sweep_at = max(_SWEEP_AT, 2 * len(self._buckets))

    @property
    def tracked(self) -> int:
        """Buckets held now (live callers, and idle ones not yet swept)."""
        return len(self._buckets)

    def acquire(self, caller: str, model: str, now: float | None = None) -> float:
        """Take a token from every matching bucket: 0.0, or the seconds to wait (none taken)."""
        now = time.monotonic() if now is None else now
        plan = self._plan.get((caller, model))
        if plan is None:
            plan = self._plan_for(caller, model, now)
        wait = 0.0
        for bucket in plan:
            if bucket.refill(now) < 1.0:
                wait = max(wait, bucket.wait_s())
        if wait > 0.0:
            return wait
        for bucket in plan:
            bucket.tokens -= 1.0
        return 0.0

    async def admit(self, caller: str, model: str) -> float:
        """``acquire`` for a transport: 0.0, or the seconds to wait (may ask a shared store)."""
        return self.acquire(caller, model)

    async def check(
        self, caller: str, model: str, on_reject: Callable[[str, str], None] | None = None
    ) -> None:
        """Take a token for (``caller``, ``model``) through ``admit``, or raise RateLimited
        (counted first through ``on_reject(model, "rate_limited")``)."""
        wait = await self.admit(caller, model)
        if wait > 0.0:
            if on_reject is not None:
                on_reject(model, RateLimited.reason)
            raise RateLimited(f"rate limit exceeded for {model}", retry_after_s=wait)


def _positive(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{what} must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(number) or number < 0 or isinstance(value, bool):
        raise InvalidInput(f"{what} must be a non-negative number")
    return number


class RequestLimits:
    """Per-request checks of the infer route: size, deadline and priority."""

    __slots__ = ("_cap_ns", "_default_ns", "max_batch", "max_elements")

    def __init__(self, config: LimitsConfig) -> None:
        #: Most rows per request (None: the batcher's limit only).
        self.max_batch = config.max_batch
        #: Most elements per request, all inputs together (None: no limit).
        self.max_elements = config.max_elements
        self._cap_ns = int(config.max_timeout_ms * 1e6)
        self._default_ns = (
            None if config.default_timeout_ms is None else int(config.default_timeout_ms * 1e6)
        )

    def check_elements(self, inputs: Mapping[str, Any]) -> None:
        """400 when the inputs hold more elements than allowed."""
        if self.max_elements is None:
            return
        total = sum(int(a.size) for a in inputs.values())
        if total > self.max_elements:
            raise InvalidInput(
                f"request has {total} elements, over the limit of {self.max_elements}"
            )

    def deadline_ns(
        self, header: str | None, parameters: Mapping[str, Any], start_ns: int
    ) -> int | None:
        """The ``perf_counter_ns`` deadline from the header (ms) or V2 ``timeout`` (µs), capped."""
        timeout_ns = self._default_ns
        cap = self._cap_ns
        if header is not None:
            ms = _positive(header, TIMEOUT_HEADER)
            if ms == 0:
                raise InvalidInput(f"{TIMEOUT_HEADER} must be above 0")
            timeout_ns = int(min(ms * 1e6, cap))  # capped first: 1e308 ms is no overflow
        if parameters and "timeout" in parameters:
            # Triton's request parameter: microseconds, 0 meaning none.
            us = _positive(parameters["timeout"], "parameter 'timeout'")
            if us > 0:
                ns = int(min(us * 1e3, cap))
                timeout_ns = ns if header is None else min(ns, timeout_ns or ns)
        if timeout_ns is None:
            return None
        return start_ns + min(timeout_ns, self._cap_ns)

    @staticmethod
    def priority(parameters: Mapping[str, Any]) -> int:
        """The V2 ``priority`` parameter (0: the default level)."""
        if not parameters or "priority" not in parameters:
            return 0
        value = parameters["priority"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidInput("parameter 'priority' must be a non-negative integer")
        return value
