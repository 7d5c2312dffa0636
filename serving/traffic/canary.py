"""The automatic canary: raises a new version's share of a route step by step.

A rollout moves a route's traffic from a baseline version to a candidate: an
optional shadow phase (the candidate gets a mirrored copy of baseline traffic and
its outputs are compared), then one step per share of traffic. Each interval the
candidate's figures (error rate, p99 latency; agreement in the shadow phase) are
compared with the baseline's, as the gateway recorded them, against the bounds.
A breach rolls the candidate back to 0% with the reason. The state is written to
a JSON file after every change, and a running rollout resumes after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.atomic_file import write_atomically
from serving.config import RolloutBounds, RouteConfig, ShadowConfig
from serving.errors import InvalidInput, ModelNotFound
from serving.inference.repository import ModelRepository
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
    verdict: Literal["pass", "breach"]
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
    limit = baseline_error_rate + bounds.max_error_rate_increase
    if candidate.error_rate > limit:
        return (
            f"error rate {candidate.error_rate:.2%} over the bound {limit:.2%} "
            f"(baseline {baseline_error_rate:.2%} + {bounds.max_error_rate_increase:.2%})"
        )
    p99 = candidate.p99_ms
    if p99 is not None and baseline_p99_ms is not None:
        p99_limit = baseline_p99_ms * bounds.max_p99_ratio + bounds.p99_slack_ms
        if p99 > p99_limit:
            return (
                f"p99 latency {p99:.1f} ms over the bound {p99_limit:.1f} ms "
                f"(baseline {baseline_p99_ms:.1f} ms x {bounds.max_p99_ratio:g} "
                f"+ {bounds.p99_slack_ms:g} ms)"
            )
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


class RolloutController:
    """Runs canary rollouts on the route table; a route is locked while its rollout runs."""

    def __init__(
        self,
        routes: RouteTable,
        repository: ModelRepository,
        state_path: Path | None,
    ) -> None:
        self._routes = routes
        self._repository = repository
        self._state_path = state_path
        self._states: dict[str, RolloutState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._rollbacks: dict[str, int] = {}

    def running(self, name: str) -> bool:
        """Whether a rollout of ``name`` is running."""
        return name in self._tasks

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
        self._states[name] = state
        shadow_phase = state.step_index < 0
        await self._apply(state, 0.0 if shadow_phase else spec.steps[0], shadow=shadow_phase)
        self._launch(state, applied=True)
        return state

    async def abort(self, name: str) -> RolloutState:
        """Stop the running rollout of ``name`` and roll the candidate back to 0%."""
        task = self._tasks.get(name)
        if task is None:
            raise RolloutConflict(f"no rollout of {name} is running")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        state = self._states[name]
        await self._roll_back(state, "stopped by an operator", status="stopped")
        return state

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
        task = asyncio.get_running_loop().create_task(self._drive(state, applied))
        self._tasks[state.model] = task
        name = state.model
        self._routes.lock(name, f"a rollout of {name} is running; stop it first")

        def forget(done: asyncio.Task[None]) -> None:
            if self._tasks.get(name) is done:
                del self._tasks[name]
                self._routes.unlock(name)

        task.add_done_callback(forget)

    async def start(self) -> None:
        """Load the state file and resume the rollouts that were running."""
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
        """Pause every running rollout (they resume at the next start)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never leave a half-rolled canary behind silently
            log.exception("rollout of %s failed", state.model)
            await self._roll_back(state, f"rollout failed: {e}")

    async def _apply(self, state: RolloutState, percent: float, *, shadow: bool = False) -> None:
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
        await self._routes.save(state.model, config)
        state.percent = percent
        await self._touch(state)

    async def _interval(self, state: RolloutState, phase: Literal["shadow", "step"]) -> bool:
        """Wait for an interval with enough candidate traffic and judge it; False on a breach."""
        base_w = self._routes.window(state.model, state.baseline)
        cand_w = self._routes.window(state.model, state.candidate)
        shadow_w = self._routes.shadow.window(state.model, state.baseline, state.candidate)
        base_w.take(), cand_w.take(), shadow_w.take()
        base, cand, shadow = LatencyFigures(), LatencyFigures(), ShadowFigures()
        bounds = state.bounds
        while True:
            await asyncio.sleep(state.interval_s)
            base, cand = base.merge(base_w.take()), cand.merge(cand_w.take())
            shadow = shadow.merge(shadow_w.take())
            if phase == "shadow":
                enough = shadow.mirrored >= bounds.min_requests
            else:  # both sides need figures, except the baseline once it gets no traffic
                enough = cand.requests >= bounds.min_requests and (
                    base.requests >= bounds.min_requests or state.percent >= 100
                )
            if enough:
                break
        if base.requests >= bounds.min_requests:
            state.reference_error_rate, state.reference_p99_ms = base.error_rate, base.p99_ms
        ref_errors = state.reference_error_rate or 0.0
        if phase == "shadow":
            reason = judge(bounds, ref_errors, None, LatencyFigures(), shadow)
        else:
            reason = judge(bounds, ref_errors, state.reference_p99_ms, cand)
        state.history.append(
            StepRecord(
                phase=phase,
                percent=state.percent,
                baseline=base.summary(),
                candidate=cand.summary(),
                shadow=shadow.summary() if phase == "shadow" else None,
                verdict="breach" if reason else "pass",
                reason=reason,
                at=time.time(),
            )
        )
        if reason:
            await self._roll_back(state, reason)
            return False
        await self._touch(state)
        return True

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

    async def _touch(self, state: RolloutState) -> None:
        state.updated_at = time.time()
        await self._save_states()

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
