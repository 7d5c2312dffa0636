"""The automatic canary: raises a new version's share of a route step by step.

A rollout moves a route's traffic from a baseline version to a candidate: an
optional shadow phase (the candidate gets a mirrored copy of baseline traffic and
its outputs are compared), then one step per share of traffic. Each interval the
candidate's figures (error rate, p99 latency; agreement in the shadow phase) are
compared with the baseline's, as the gateway recorded them, against the bounds.
A breach rolls the candidate back to 0% with the reason. A p99 breach first holds
the step and judges fresh intervals (``p99_breaches`` in a row roll back): a pause
of the host slows whichever requests are in flight, at times the candidate's alone.
The state is written to a JSON file after every change, and a running rollout
resumes after a restart.

With a shared control store, the state lives in the store and one gateway drives
each rollout: the holder of its lease, whose every write carries the lease's fencing
value (a driver that lost the lease is refused and stops, rolling nothing back).
Intervals are judged on the figures of every gateway, merged in the store. If the
driver dies, another gateway takes the lease once it expires and carries the rollout
on from its current step. While the store is down the driver holds its step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Literal, TypeVar

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.atomic_file import write_atomically
from serving.config import RolloutBounds, RouteConfig, ShadowConfig
from serving.control.store import ControlStore, StoreConflict, StoreUnavailable
from serving.errors import InvalidInput, ModelNotFound
from serving.inference.repository import ModelRepository
from serving.traffic.fleet_figures import decode_latency, decode_shadow, shadow_key, version_key
from serving.traffic.route_table import RolloutConflict, RouteTable
from serving.traffic.windows import LatencyFigures, ShadowFigures

__all__ = [
    "RolloutConflict",
    "RolloutController",
    "RolloutSpec",
    "RolloutState",
    "StepRecord",
    "judge",
]

log = logging.getLogger("fermion.rollout")

_T = TypeVar("_T")

#: An interval's figures: the baseline's, the candidate's, the shadow comparisons.
_Figures = tuple[LatencyFigures, LatencyFigures, ShadowFigures]
#: Reads (and resets) the figures since its last call.
_Taker = Callable[[], Awaitable[_Figures]]


class _FencedOut(Exception):
    """Another gateway holds this rollout's lease now: stop driving, change nothing."""


class RolloutSpec(BaseModel):
    """What to roll out: the body of ``POST /admin/rollouts/{model}``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    to: int = Field(ge=1)
    from_: int | None = Field(default=None, alias="from", ge=1)
    #: The candidate's share at each step, in percent, increasing.
    steps: list[float] = Field(default_factory=lambda: [1.0, 5.0, 25.0, 50.0, 100.0])
    interval_s: float = Field(default=60.0, ge=0.05, le=86_400.0)
    #: Mirror this share of baseline traffic to the candidate first (0: no shadow phase).
    shadow_percent: float = Field(default=0.0, ge=0.0, le=100.0)
    #: Overrides the route's ``rollout`` bounds.
    bounds: RolloutBounds | None = None

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 < s <= 100 for s in steps):
            raise ValueError("steps are shares in percent, each in (0, 100]")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError("steps must increase")
        return steps


class StepRecord(BaseModel):
    """The figures of one judged interval and the verdict."""

    phase: Literal["shadow", "step"]
    percent: float
    baseline: dict[str, float | int | None]
    candidate: dict[str, float | int | None]
    shadow: dict[str, float | int | None] | None = None
    #: "hold": over the p99 bound, judged again before it counts (``p99_breaches``).
    verdict: Literal["pass", "hold", "breach"]
    reason: str = ""
    at: float


class RolloutState(BaseModel):
    """A rollout's progress, as ``fermion rollout status`` shows it and the state file keeps it."""

    model: str
    baseline: int
    candidate: int
    steps: list[float]
    interval_s: float
    shadow_percent: float
    bounds: RolloutBounds
    status: Literal["running", "promoted", "rolled_back", "stopped"] = "running"
    #: -1 during the shadow phase, else the index of the current (or last) step.
    step_index: int = 0
    #: The candidate's share of traffic now, in percent.
    percent: float = 0.0
    reason: str = ""
    history: list[StepRecord] = Field(default_factory=list)
    #: The last baseline figures with enough requests, for steps where it gets none.
    reference_error_rate: float | None = None
    reference_p99_ms: float | None = None
    #: The route's shadow before the rollout, restored after the shadow phase.
    original_shadow: ShadowConfig | None = None
    started_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)


def judge(
    bounds: RolloutBounds,
    baseline_error_rate: float,
    baseline_p99_ms: float | None,
    candidate: LatencyFigures,
    shadow: ShadowFigures | None = None,
) -> str:
    """Why the candidate breaches ``bounds`` against the baseline ("" when it does not)."""
    breach = _error_breach(bounds, baseline_error_rate, candidate) or _latency_breach(
        bounds, baseline_p99_ms, candidate
    )
    if breach:
        return breach
    if shadow is not None:
        if shadow.error_rate > bounds.max_error_rate_increase:
            return (
                f"shadow error rate {shadow.error_rate:.2%} over the bound "
                f"{bounds.max_error_rate_increase:.2%}"
            )
        agreement = shadow.top1_agreement
        if (
            bounds.min_top1_agreement is not None
            and agreement is not None
            and agreement < bounds.min_top1_agreement
        ):
            return (
                f"top-1 agreement {agreement:.2%} under the bound {bounds.min_top1_agreement:.2%}"
            )
        diff = shadow.max_abs_diff
        if bounds.max_abs_diff is not None and diff is not None and diff > bounds.max_abs_diff:
            return f"max abs difference {diff:g} over the bound {bounds.max_abs_diff:g}"
    return ""


def _error_breach(
    bounds: RolloutBounds, baseline_error_rate: float, candidate: LatencyFigures
) -> str:
    """Why the candidate's error rate breaches ``bounds`` ("" when it does not)."""
    limit = baseline_error_rate + bounds.max_error_rate_increase
    if candidate.error_rate <= limit:
        return ""
    return (
        f"error rate {candidate.error_rate:.2%} over the bound {limit:.2%} "
        f"(baseline {baseline_error_rate:.2%} + {bounds.max_error_rate_increase:.2%})"
    )


def _latency_breach(
    bounds: RolloutBounds, baseline_p99_ms: float | None, candidate: LatencyFigures
) -> str:
    """Why the candidate's p99 breaches ``bounds`` ("" when it does not, or can't be told)."""
    p99 = candidate.p99_ms
    if p99 is None or baseline_p99_ms is None:
        return ""
    p99_limit = baseline_p99_ms * bounds.max_p99_ratio + bounds.p99_slack_ms
    if p99 <= p99_limit:
        return ""
    return (
        f"p99 latency {p99:.1f} ms over the bound {p99_limit:.1f} ms "
        f"(baseline {baseline_p99_ms:.1f} ms x {bounds.max_p99_ratio:g} "
        f"+ {bounds.p99_slack_ms:g} ms)"
    )


class RolloutController:
    """Runs canary rollouts on the route table; a route is locked while its rollout runs."""

    def __init__(
        self,
        routes: RouteTable,
        repository: ModelRepository,
        state_path: Path | None,
        *,
        store: ControlStore | None = None,
        holder: str = "",
        lease_ttl_s: float = 2.0,
        retry_s: float = 0.25,
    ) -> None:
        self._routes = routes
        self._repository = repository
        self._state_path = state_path
        self._states: dict[str, RolloutState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._rollbacks: dict[str, int] = {}
        self._store = store
        #: This gateway's name in leases.
        self._holder = holder
        self._lease_ttl_s = lease_ttl_s
        self._retry_s = retry_s
        #: The fencing value of each lease held here.
        self._fences: dict[str, str] = {}

    def running(self, name: str) -> bool:
        """Whether a rollout of ``name`` is running (anywhere in the fleet, with a store)."""
        if name in self._tasks:
            return True
        state = self._states.get(name)
        return self._store is not None and state is not None and state.status == "running"

    def driving(self) -> list[str]:
        """The rollouts this gateway drives now."""
        return sorted(self._tasks)

    def states(self) -> list[RolloutState]:
        """Every rollout known (running or finished), by model."""
        return [self._states[n] for n in sorted(self._states)]

    def state(self, name: str) -> RolloutState:
        """The current or last rollout of ``name``."""
        state = self._states.get(name)
        if state is None:
            raise ModelNotFound(f"no rollout of {name} has run")
        return state

    async def begin(self, name: str, spec: RolloutSpec) -> RolloutState:
        """Start rolling ``spec.to`` out on route ``name``."""
        if self.running(name):
            raise RolloutConflict(f"a rollout of {name} is already running")
        route = self._routes.get(name)
        baseline = spec.from_ if spec.from_ is not None else self._baseline(name, spec.to)
        if baseline == spec.to:
            raise InvalidInput("the baseline and the candidate are the same version")
        state = RolloutState(
            model=name,
            baseline=baseline,
            candidate=spec.to,
            steps=spec.steps,
            interval_s=spec.interval_s,
            shadow_percent=spec.shadow_percent,
            bounds=spec.bounds or (route.config.rollout if route else RolloutBounds()),
            step_index=-1 if spec.shadow_percent > 0 else 0,
            original_shadow=route.shadow if route else None,
        )
        probe = RouteConfig(split={baseline: 1.0, spec.to: 1.0})
        self._routes.check_versions(name, probe)
        if self._store is not None:
            await self._store.create_rollout(name, state.model_dump_json())
            # A new running state was just written: any lease left is a finished rollout's.
            fence = await self._store.acquire_lease(
                name, self._holder, self._lease_ttl_s, force=True
            )
            assert fence is not None
            self._fences[name] = fence
        self._states[name] = state
        shadow_phase = state.step_index < 0
        await self._apply(
            state, 0.0 if shadow_phase else spec.steps[0], shadow=shadow_phase, hold=False
        )
        self._launch(state, applied=True)
        return state

    async def abort(self, name: str) -> RolloutState:
        """Stop the running rollout of ``name`` and roll the candidate back to 0%."""
        if self._store is not None:
            return await self._abort_fleet(name)
        task = self._tasks.get(name)
        if task is None:
            raise RolloutConflict(f"no rollout of {name} is running")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        state = self._states[name]
        await self._roll_back(state, "stopped by an operator", status="stopped")
        return state

    async def _abort_fleet(self, name: str) -> RolloutState:
        """Take the lease from whichever gateway drives (fencing it out), then roll back."""
        assert self._store is not None
        await self.refresh()
        if not self.running(name):
            raise RolloutConflict(f"no rollout of {name} is running")
        task = self._tasks.get(name)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        fence = await self._store.acquire_lease(name, self._holder, self._lease_ttl_s, force=True)
        assert fence is not None
        self._fences[name] = fence
        raw = (await self._store.rollouts()).get(name)
        state = RolloutState.model_validate_json(raw) if raw else self._states[name]
        self._states[name] = state
        try:
            await self._roll_back(state, "stopped by an operator", status="stopped")
        finally:
            await self._release(name)
        return state

    # ----------------------------------------------------------------- the fleet

    async def refresh(self) -> list[str]:
        """Read every rollout's state from the store; the running ones no gateway here drives.

        Without a store, or while it is down, the states known here stay as they are.
        """
        if self._store is None:
            return []
        try:
            raw = await self._store.rollouts()
        except StoreUnavailable:
            return []
        undriven = []
        for name, text in raw.items():
            if name in self._tasks:
                continue  # the state driven here is the freshest
            try:
                state = RolloutState.model_validate_json(text)
            except ValidationError as e:
                log.error("rollout state of %s in the control store is not valid: %s", name, e)
                continue
            self._states[name] = state
            if state.status == "running":
                undriven.append(name)
        return undriven

    def running_rollouts(self) -> list[tuple[str, int, int]]:
        """(model, baseline, candidate) of every rollout running in the fleet."""
        return [(s.model, s.baseline, s.candidate) for s in self.states() if s.status == "running"]

    def running_states(self) -> dict[str, str]:
        """The running rollouts' states as JSON (to seed a store that lost its data)."""
        return {s.model: s.model_dump_json() for s in self.states() if s.status == "running"}

    async def take_over(self, name: str) -> bool:
        """Drive ``name``'s rollout from its current step if its lease is free; True if so."""
        assert self._store is not None
        if name in self._tasks:
            return False
        fence = await self._store.acquire_lease(name, self._holder, self._lease_ttl_s)
        if fence is None:
            return False
        raw = (await self._store.rollouts()).get(name)
        state = RolloutState.model_validate_json(raw) if raw else None
        if state is None or state.status != "running":
            await self._store.release_lease(name, fence)
            return False
        self._fences[name] = fence
        self._states[name] = state
        log.info("taking over the rollout of %s at step %d", name, state.step_index)
        self._launch(state)
        return True

    async def _fleet(self, op: Callable[[], Awaitable[_T]]) -> _T:
        """Run a store call of the driver: hold (retry) while the store is down."""
        while True:
            try:
                return await op()
            except StoreUnavailable:
                await asyncio.sleep(self._retry_s)
            except StoreConflict as e:
                raise _FencedOut(e.message) from None

    async def _renew(self, name: str, task: asyncio.Task[None]) -> None:
        """Keep the lease of a driven rollout; cancel the driving when it is lost."""
        assert self._store is not None
        while not task.done():
            await asyncio.sleep(self._lease_ttl_s / 3)
            fence = self._fences.get(name)
            if fence is None:
                return
            try:
                held = await self._store.renew_lease(name, fence, self._lease_ttl_s)
            except StoreUnavailable:
                continue
            if not held:
                log.warning("lost the lease of the rollout of %s; another gateway drives it", name)
                task.cancel()
                return

    async def _release(self, name: str) -> None:
        fence = self._fences.pop(name, None)
        if fence is not None and self._store is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._store.release_lease(name, fence)

    def _baseline(self, name: str, candidate: int) -> int:
        route = self._routes.get(name)
        if route is not None:
            others = {v: w for v, w in route.split.weights.items() if v != candidate and w > 0}
            if others:
                return max(others, key=lambda v: (others[v], v))
        served = [v for v in self._repository.versions(name) if v != candidate]
        if not served:
            raise InvalidInput(f"model {name} serves no version other than {candidate}")
        return max(served)

    def _launch(self, state: RolloutState, *, applied: bool = False) -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._drive(state, applied))
        self._tasks[state.model] = task
        name = state.model
        self._routes.lock(name, f"a rollout of {name} is running; stop it first")
        renewer = loop.create_task(self._renew(name, task)) if self._store is not None else None

        def forget(done: asyncio.Task[None]) -> None:
            if renewer is not None:
                renewer.cancel()
            if self._tasks.get(name) is done:
                del self._tasks[name]
                self._routes.unlock(name)

        task.add_done_callback(forget)

    async def start(self) -> None:
        """Load the state file and resume the rollouts that were running.

        With a store, its states are read instead (the sync loop takes over running ones).
        """
        if self._store is not None:
            await self.refresh()
            return
        if self._state_path is None or not self._state_path.exists():
            return
        try:
            raw = self._state_path.read_text(encoding="utf-8")
            states = _StateFile.model_validate_json(raw).rollouts
        except (OSError, ValidationError) as e:
            log.error("ignoring rollout state %s: %s", self._state_path, e)
            return
        for state in states:
            self._states[state.model] = state
            if state.status == "running":
                log.info("resuming the rollout of %s at step %d", state.model, state.step_index)
                self._launch(state)

    async def stop(self) -> None:
        """Pause every running rollout (they resume at the next start, or on another gateway
        of the fleet at once: the leases are released)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for name in list(self._fences):
            await self._release(name)

    async def _drive(self, state: RolloutState, applied: bool) -> None:
        try:
            if state.step_index < 0:
                if not applied:
                    await self._apply(state, 0.0, shadow=True)
                if not await self._interval(state, "shadow"):
                    return
                state.step_index = 0
                applied = False
            while state.step_index < len(state.steps):
                if not applied:
                    await self._apply(state, state.steps[state.step_index])
                applied = False
                if not await self._interval(state, "step"):
                    return
                if state.step_index == len(state.steps) - 1:
                    break
                state.step_index += 1
            state.status = "promoted"
            state.reason = f"version {state.candidate} at {state.percent:g}% passed every step"
            await self._touch(state)
            log.info("rollout of %s: %s", state.model, state.reason)
            await self._release(state.model)
        except asyncio.CancelledError:
            raise
        except _FencedOut as e:
            log.warning("stopped driving the rollout of %s: %s", state.model, e)
            self._fences.pop(state.model, None)
        except Exception as e:  # never leave a half-rolled canary behind silently
            log.exception("rollout of %s failed", state.model)
            try:
                await self._roll_back(state, f"rollout failed: {e}")
            except _FencedOut:
                self._fences.pop(state.model, None)

    async def _apply(
        self, state: RolloutState, percent: float, *, shadow: bool = False, hold: bool = True
    ) -> None:
        """Set the candidate's share; ``hold``: wait out a store that is down (else 503)."""
        route = self._routes.get(state.model)
        base = route.config if route else RouteConfig(split={state.baseline: 1.0})
        mirror = (
            ShadowConfig(version=state.candidate, percent=state.shadow_percent)
            if shadow
            else state.original_shadow
        )
        config = base.model_copy(
            update={
                "split": {state.baseline: 100.0 - percent, state.candidate: percent},
                "shadow": mirror,
            }
        )
        if self._store is None:
            await self._routes.save(state.model, config)
        else:
            fence = self._fences.get(state.model)
            if fence is None:
                raise _FencedOut("no lease held")
            routes = self._routes

            def save() -> Awaitable[None]:
                return routes.save(state.model, config, fence=fence)

            await (self._fleet(save) if hold else save())
        state.percent = percent
        await self._touch(state, hold=hold)

    async def _interval(self, state: RolloutState, phase: Literal["shadow", "step"]) -> bool:
        """Judge intervals of this step until one passes (True) or the candidate is rolled
        back (False).

        Over the p99 bound the step holds and a fresh interval is judged, up to
        ``p99_breaches`` in a row: a pause of the host (or of this gateway) catches
        whichever requests are in flight, and can fall on the candidate's alone. Any other
        breach rolls back at once.
        """
        take = self._figures_taker(state)
        await self._fleet(take)
        bounds = state.bounds
        slow_in_a_row = 0
        while True:
            base, cand, shadow = await self._gather(state, phase, take)
            if base.requests >= bounds.min_requests:
                state.reference_error_rate, state.reference_p99_ms = base.error_rate, base.p99_ms
            ref_errors = state.reference_error_rate or 0.0
            if phase == "shadow":
                reason, slow = judge(bounds, ref_errors, None, LatencyFigures(), shadow), ""
            else:
                reason = _error_breach(bounds, ref_errors, cand)
                slow = "" if reason else _latency_breach(bounds, state.reference_p99_ms, cand)
                reason = reason or slow
            slow_in_a_row = slow_in_a_row + 1 if slow else 0
            verdict: Literal["pass", "hold", "breach"] = "breach"
            if not reason:
                verdict = "pass"
            elif slow and slow_in_a_row < bounds.p99_breaches:
                verdict = "hold"
            state.history.append(
                StepRecord(
                    phase=phase,
                    percent=state.percent,
                    baseline=base.summary(),
                    candidate=cand.summary(),
                    shadow=shadow.summary() if phase == "shadow" else None,
                    verdict=verdict,
                    reason=reason,
                    at=time.time(),
                )
            )
            if verdict == "breach":
                await self._roll_back(state, reason)
                return False
            await self._touch(state)
            if verdict == "pass":
                return True
            log.warning(
                "rollout of %s holds at %g%% (%d of %d p99 breaches in a row): %s",
                state.model,
                state.percent,
                slow_in_a_row,
                bounds.p99_breaches,
                reason,
            )

    async def _gather(
        self, state: RolloutState, phase: Literal["shadow", "step"], take: _Taker
    ) -> _Figures:
        """The figures of one interval, extended until they hold enough requests to judge."""
        base, cand, shadow = LatencyFigures(), LatencyFigures(), ShadowFigures()
        bounds = state.bounds
        while True:
            await asyncio.sleep(state.interval_s)
            try:
                more = await take()
            except StoreUnavailable:
                continue  # no figures: hold the step, judge nothing
            base, cand, shadow = base.merge(more[0]), cand.merge(more[1]), shadow.merge(more[2])
            if phase == "shadow":
                enough = shadow.mirrored >= bounds.min_requests
            else:  # both sides need figures, except the baseline once it gets no traffic
                enough = cand.requests >= bounds.min_requests and (
                    base.requests >= bounds.min_requests or state.percent >= 100
                )
            if enough:
                return base, cand, shadow

    def _figures_taker(self, state: RolloutState) -> _Taker:
        """Reads (and resets) the interval's figures: this gateway's, or the fleet's."""
        model, baseline, candidate = state.model, state.baseline, state.candidate
        store = self._store
        if store is None:
            base_w = self._routes.window(model, baseline)
            cand_w = self._routes.window(model, candidate)
            shadow_w = self._routes.shadow.window(model, baseline, candidate)

            async def take_local() -> _Figures:
                return base_w.take(), cand_w.take(), shadow_w.take()

            return take_local
        names = [
            version_key(model, baseline),
            version_key(model, candidate),
            shadow_key(model, baseline, candidate),
        ]

        async def take_fleet() -> _Figures:
            figures = await store.take_figures(names)
            return (
                decode_latency(figures[names[0]]),
                decode_latency(figures[names[1]]),
                decode_shadow(figures[names[2]]),
            )

        return take_fleet

    async def _roll_back(
        self,
        state: RolloutState,
        reason: str,
        status: Literal["rolled_back", "stopped"] = "rolled_back",
    ) -> None:
        state.status, state.reason = status, reason
        await self._apply(state, 0.0)
        self._rollbacks[state.model] = self._rollbacks.get(state.model, 0) + 1
        log.warning("rollout of %s rolled back: %s", state.model, reason)

    async def _touch(self, state: RolloutState, *, hold: bool = True) -> None:
        state.updated_at = time.time()
        if self._store is None:
            await self._save_states()
            return
        store, fence = self._store, self._fences.get(state.model)
        if fence is None:
            raise _FencedOut("no lease held")
        text = state.model_dump_json()

        def save() -> Awaitable[bool]:
            return store.save_rollout(state.model, text, fence=fence)

        if not await (self._fleet(save) if hold else save()):
            raise _FencedOut("the lease was taken by another gateway")

    async def _save_states(self) -> None:
        if self._state_path is None:
            return
        text = _StateFile(rollouts=self.states()).model_dump_json(indent=2)
        await asyncio.to_thread(write_atomically, self._state_path, text)

    def collect(self) -> Iterator[Metric]:
        """The rollout families: the candidate's share now, and rollbacks."""
        step = GaugeMetricFamily(
            "fermion_rollout_step_percent",
            "The candidate's share of traffic in the model's current or last rollout, in percent.",
            labels=["model", "candidate"],
        )
        for state in self.states():
            step.add_metric([state.model, str(state.candidate)], state.percent)
        yield step
        rollbacks = CounterMetricFamily(
            "fermion_rollout_rollbacks",
            "Rollouts rolled back to 0%, automatically or by an operator.",
            labels=["model"],
        )
        for model, count in sorted(self._rollbacks.items()):
            rollbacks.add_metric([model], count)
        yield rollbacks


class _StateFile(BaseModel):
    rollouts: list[RolloutState]
